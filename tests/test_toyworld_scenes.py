"""The toy world's data, detector and true preference (numpy only, no ComfyUI, fast).

The detector must read back what was drawn — otherwise every text-alignment and coverage figure
of docs/reproduction.md would measure the detector, not the model — and the true preference must
have the taste its doc says (tests that would fail if a weight's sign or a threshold were wrong).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from rewardtune.toyworld import detector as D
from rewardtune.toyworld import preference as P
from rewardtune.toyworld import scenes as S


def test_scenes_are_deterministic_and_follow_their_captions():
    a, b = S.sample_scenes(3, 50), S.sample_scenes(3, 50)
    assert a == b and [s.caption for s in a] == [s.caption for s in b]
    assert S.sample_scenes(4, 50) != a
    for s in a:
        pairs, relation = S.parse_caption(s.caption)
        assert pairs == [sh.pair for sh in s.shapes]
        assert relation == s.relation
        if relation:
            assert S.relation_of(s.shapes[0], s.shapes[1]) == relation
        for sh in s.shapes:  # inside the picture, clear of the others
            assert sh.radius <= sh.x <= S.SIZE - sh.radius and sh.radius <= sh.y <= S.SIZE - sh.radius


def test_training_scenes_never_show_a_held_out_pair():
    seen = {sh.pair for s in S.sample_scenes(0, 3000) for sh in s.shapes}
    assert seen == set(S.TRAIN_PAIRS)
    assert not seen & S.HELD_OUT_PAIRS
    for c in S.held_out_captions():
        assert set(S.parse_caption(c)[0]) & S.HELD_OUT_PAIRS, c
    for c in S.seen_captions():
        assert not set(S.parse_caption(c)[0]) & S.HELD_OUT_PAIRS, c


def test_caption_grammar_round_trips():
    for pairs, rel in ([[("red", "circle")], None], [[("blue", "square"), ("green", "circle")], "to the left of"],
                       [[("red", "circle"), ("blue", "square"), ("yellow", "triangle")], None]):
        assert S.parse_caption(S.caption_of(pairs, rel)) == (pairs, rel)
    with pytest.raises(ValueError, match="not a toy-world caption"):
        S.parse_caption("a photo of a cat")


def test_detector_reads_back_what_was_drawn():
    scenes = S.sample_scenes(11, 600)
    dets = D.detect_batch(S.render_batch(scenes))
    full = [D.alignment(s.caption, d) for s, d in zip(scenes, dets)]
    exact = np.mean([a.matches and a.extra == 0 and a.relation in (None, True) for a in full])
    assert exact >= 0.99, exact                      # measured 0.997 on 2000 scenes
    assert all(d.background == s.background for s, d in zip(scenes, dets))
    # positions and sizes, where a scene has one shape
    for s, d in zip(scenes, dets):
        if len(s.shapes) == 1 and len(d.shapes) == 1:
            assert math.hypot(d.shapes[0].x - s.shapes[0].x, d.shapes[0].y - s.shapes[0].y) < 1.5
            assert abs(d.shapes[0].radius - s.shapes[0].radius) < 1.5


@pytest.mark.parametrize("kind", S.SHAPES)
def test_detector_tells_shapes_apart_at_every_rotation(kind):
    for angle in range(0, 120, 7):
        for radius in (7.0, 11.0, 15.0):
            scene = S.Scene("white", (S.Shape(kind, "red", 32.0, 32.0, radius, float(angle)),), None, f"a red {kind}")
            found = D.detect(S.render(scene)).shapes
            assert [(f.kind, f.colour) for f in found] == [(kind, "red")], (angle, radius, found)


def test_detector_on_blurred_and_noisy_pictures_sees_clutter_and_the_border():
    rng = np.random.default_rng(0)
    scene = S.sample_scene(rng, pairs=[("red", "circle")], background="white")
    clean = S.render(scene)
    assert D.detect(clean).clutter < 0.01 and not D.detect(clean).touches_edge   # rims: ≤ 0.0073 measured
    noisy = clean.copy()
    noisy[rng.random(noisy.shape[:2]) < 0.05] = (20, 20, 200)   # 5 % stray blue pixels
    assert D.detect(noisy).clutter > 0.1
    off = S.Scene("white", (S.Shape("square", "blue", 6, 32, 12.0, 0.0),), None, "a blue square")
    assert D.detect(S.render(off)).touches_edge


def test_coverage_is_one_when_spread_and_zero_when_collapsed():
    spread = D.detect_batch(S.render_batch(S.sample_scenes(5, 200, pairs=[("red", "circle")])))
    cov = D.coverage(spread)
    assert cov["background"] > 0.95 and cov["position"] > 0.6 and cov["size"] > 0.8
    same = S.Scene("black", (S.Shape("circle", "red", 32, 32, 12.0),), None, "a red circle")
    collapsed = D.coverage(D.detect_batch(S.render_batch([same] * 20)))
    assert collapsed == {"background": 0.0, "position": 0.0, "size": 0.0, "mean": 0.0}


def _one(kind="circle", colour="red", x=32.0, y=32.0, r=11.0, bg="light grey"):
    return S.Scene(bg, (S.Shape(kind, colour, x, y, r, 10.0),), None, f"a {colour} {kind}")


def test_true_preference_has_the_documented_taste():
    score = P.score_scene
    base = score(_one())
    off_caption = S.Scene("light grey", _one(colour="blue", kind="square").shapes, None, "a red circle")
    assert score(off_caption) < base - 2.0                              # not what the caption says
    assert score(_one(r=14.0)) > score(_one(r=8.0))                      # bigger, within the world's sizes
    assert score(_one(bg="black")) > score(_one(bg="white"))             # dark backgrounds
    assert score(_one(x=32, y=32)) > score(_one(x=14, y=14))             # centred
    # past the world's sizes bigger is worse, and touching the border worse still
    assert score(_one(r=15.0)) > score(_one(r=22.0)) > score(_one(r=34.0))
    two = S.sample_scene(np.random.default_rng(1), pairs=[("red", "circle"), ("blue", "square")], relation="above")
    wrong = S.Scene(two.background, two.shapes, None, "a red circle below a blue square")
    assert score(two) > score(wrong)                                      # the relation counts


def test_true_preference_scores_images_through_the_detector():
    scenes = S.sample_scenes(7, 20)
    imgs = S.render_batch(scenes)
    assert np.allclose(P.score_images(imgs, [s.caption for s in scenes]), [P.score_scene(s) for s in scenes])
