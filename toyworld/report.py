"""docs/reproduction.md from a reproduction's results: the papers' claims, each with the figures
measured here and whether it holds; the tables; the reward–diversity plots; sample grids.

The verdicts are computed (``claims``), not written by hand, so the report says what the figures
say; tests/test_reproduction.py asserts the directions that hold on the reduced plan.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ..metrics.plot import tradeoff_plot
from .reproduce import COMMON, Result

METRICS = ("proxy", "true", "aligned", "diversity", "vendi", "coverage", "clutter", "edge")


@dataclass
class Stat:
    mean: float
    std: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3g} ± {self.std:.2g}" if self.n > 1 else f"{self.mean:.3g}"

    def above(self, other: "Stat") -> bool:
        """Higher by more than both spreads together (one seed: just higher)."""
        return self.mean - other.mean > self.std + other.std

    def below(self, other: "Stat") -> bool:
        return other.above(self)


def stat(results: list[Result], label: str, metric: str, k=None, power=None) -> Stat | None:
    rows = [r for r in results if r.label == label and r.k == k and r.power == power]
    if not rows:
        return None
    vals = []
    for r in rows:
        v = r.row().get(metric) if not hasattr(r.figures, metric) else getattr(r.figures, metric)
        if v is not None:
            vals.append(v)
    if not vals:
        return None
    return Stat(float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals))


@dataclass
class Claim:
    paper: str
    claim: str
    measured: str
    holds: bool | None          # None: not measured in this plan


def _have(*stats) -> bool:
    return all(s is not None for s in stats)


def claims(results: list[Result]) -> list[Claim]:
    S = lambda label, metric, **kw: stat(results, label, metric, **kw)  # noqa: E731
    out = []
    base_p, base_d, base_t = S("base", "proxy"), S("base", "diversity"), S("base", "true")
    refl_p, refl_d, refl_t = S("ReFL", "proxy"), S("ReFL", "diversity"), S("ReFL", "true")
    if _have(base_p, refl_p):
        out.append(Claim("both", "Reward fine-tuning (ReFL) raises the learned reward and cuts diversity",
                         f"learned reward {base_p} → {refl_p}; diversity {base_d} → {refl_d}; coverage "
                         f"{S('base', 'coverage')} → {S('ReFL', 'coverage')}",
                         refl_p.above(base_p) and refl_d.below(base_d)))
    n = COMMON["num_steps"]
    ks = sorted({r.k for r in results if r.label == "ReFL combined" and r.k is not None})
    if ks and _have(base_p, refl_p):
        k = min(ks, key=lambda v: abs(v - 0.75 * n))    # the paper's k = 30 of 40
        cp, cd = S("ReFL combined", "proxy", k=k), S("ReFL combined", "diversity", k=k)
        kept = (cp.mean - base_p.mean) / (refl_p.mean - base_p.mean) if refl_p.mean != base_p.mean else float("nan")
        back = (cd.mean - refl_d.mean) / (base_d.mean - refl_d.mean) if base_d.mean != refl_d.mean else float("nan")
        out.append(Claim("ImageReFL §3", f"Combined generation (base for k = {k} of {n} steps, then the ReFL "
                         "model) keeps most of the reward gain at a diversity close to the base's",
                         f"reward {cp} keeps {kept:.0%} of ReFL's gain; diversity {cd} recovers {back:.0%} of what "
                         "ReFL lost", bool(kept > 0.5 and back > 0.5)))
        blends = [r for r in results if r.label == "ReFL blend"]
        if blends:
            comb = [(S("ReFL combined", "diversity", k=kk).mean, S("ReFL combined", "proxy", k=kk).mean) for kk in ks]
            comb += [(base_d.mean, base_p.mean), (refl_d.mean, refl_p.mean)]
            powers = sorted({r.power for r in blends})
            beaten = 0
            for p in powers:
                bd, bp = S("ReFL blend", "diversity", power=p).mean, S("ReFL blend", "proxy", power=p).mean
                # beaten: some combined point at least as good on both axes, or the blend point lies
                # under the combined points' line between its neighbours in diversity
                if any(d >= bd and pr >= bp for d, pr in comb) or bp <= np.interp(bd, *zip(*sorted(comb))):
                    beaten += 1
            out.append(Claim("ImageReFL §3", "Combined generation beats the ReFL AIG blend baseline "
                             "(ε = γ_i·ε_base + (1 − γ_i)·ε_tuned, γ_i = 1 − (i/N)^p)",
                             f"{beaten} of {len(powers)} blend points (p = {', '.join(f'{p:g}' for p in powers)}) lie on "
                             "or under the combined curve", beaten == len(powers)))
    img_p, img_d = S("ImageReFL", "proxy"), S("ImageReFL", "diversity")
    if _have(img_p, refl_p, base_p):
        gain = (img_p.mean - base_p.mean) / (refl_p.mean - base_p.mean) if refl_p.mean != base_p.mean else float("nan")
        out.append(Claim("ImageReFL §4", "ImageReFL keeps more diversity than ReFL at a similar reward",
                         f"diversity {img_d} vs ReFL {refl_d}; reward {img_p} vs ReFL {refl_p} ({gain:.0%} of ReFL's gain)",
                         bool(img_d.above(refl_d) and gain > 0.5)))
    sq_p, sq_t = S("SQDF", "proxy"), S("SQDF", "true")
    if _have(sq_t, refl_t, base_t):
        over = refl_p.above(base_p) and refl_t.mean < base_t.mean
        out.append(Claim("SQDF §5", "SQDF reaches a higher true preference than ReFL when the proxy is "
                         "over-optimised", f"ReFL: learned reward {base_p} → {refl_p}, true preference {base_t} → "
                         f"{refl_t} ({'over-optimised' if over else 'not over-optimised'}); SQDF: learned reward {sq_p}, "
                         f"true preference {sq_t}", bool(sq_t.above(refl_t)) if over else None))
    alphas = [(a, lab) for a, lab in ((0.5, "SQDF α=0.5"), (2.0, "SQDF"), (8.0, "SQDF α=8")) if S(lab, "proxy")]
    if len(alphas) == 3:
        p = [S(lab, "proxy").mean for _, lab in alphas]
        kl = [S(lab, "train_kl").mean for _, lab in alphas]
        d = [S(lab, "diversity").mean for _, lab in alphas]
        mono = p[0] >= p[1] >= p[2] and kl[0] >= kl[1] >= kl[2] and d[0] <= d[1] <= d[2]
        out.append(Claim("SQDF §5", "The KL weight α trades reward for KL and diversity monotonically",
                         "α = 0.5 / 2 / 8: learned reward " + " / ".join(f"{v:.3g}" for v in p) + "; KL " +
                         " / ".join(f"{v:.3g}" for v in kl) + "; diversity " + " / ".join(f"{v:.3g}" for v in d), mono))
    nb_p, nb_d = S("SQDF no buffer", "proxy"), S("SQDF no buffer", "diversity")
    if _have(nb_p, sq_p):
        out.append(Claim("SQDF ablation", "Without the replay buffer SQDF reaches a higher reward with less diversity",
                         f"no buffer: reward {nb_p}, diversity {nb_d}; with: reward {sq_p}, diversity "
                         f"{S('SQDF', 'diversity')}", bool(nb_p.above(sq_p) and nb_d.below(S("SQDF", "diversity")))))
    g1_p, g1_t = S("SQDF γ=1", "proxy"), S("SQDF γ=1", "true")
    if _have(g1_p, sq_p):
        out.append(Claim("SQDF §4", "A discount γ < 1 (0.9) does better than none (γ = 1)",
                         f"γ = 0.9: reward {sq_p}, true preference {sq_t}; γ = 1: reward {g1_p}, true preference {g1_t}",
                         bool(sq_t.above(g1_t) or sq_p.above(g1_p))))
    return out


# ------------------------------------------------------------------------------ pictures
def grid(images: np.ndarray, captions: list[str], per_caption: int, columns: int = 4, rows: int = 4) -> Image.Image:
    """The first ``rows`` captions × ``columns`` pictures, enlarged 2×."""
    size = images.shape[1]
    out = Image.new("RGB", (columns * size * 2, rows * size * 2), "white")
    for r in range(min(rows, len(captions))):
        for c in range(columns):
            im = Image.fromarray((images[r * per_caption + c] * 255).round().astype(np.uint8))
            out.paste(im.resize((size * 2, size * 2), Image.NEAREST), (c * size * 2, r * size * 2))
    return out


def labelled_strip(panels: list[tuple[str, Image.Image]]) -> Image.Image:
    pad = 20
    w = sum(p.width for _, p in panels) + 8 * (len(panels) - 1)
    h = max(p.height for _, p in panels) + pad
    out = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(out)
    x = 0
    for name, p in panels:
        d.text((x + 4, 3), name, fill="black")
        out.paste(p, (x, pad))
        x += p.width + 8
    return out


def _ascii(label: str) -> str:
    return label.replace("α", "a").replace("γ", "g")


def write(rep, results: list[Result], seconds: float, images_dir: str, images_rel: str) -> str:
    """The report (markdown); the plots and grids are written into ``images_dir``."""
    from . import world as W
    plan = rep.plan
    manifest = W.manifest(rep.world.folder)
    labels = ["base"] + list(plan.runs)
    lines = [f"# Reproduction in the toy world ({plan.name} plan)", "",
             f"Measured by `python scripts/reproduce.py{' --plan reduced' if plan.name == 'reduced' else ''}` in "
             f"{seconds / 60:.1f} min on this machine ({len(plan.seeds)} seed(s), {plan.steps} optimizer steps a run, "
             f"{len(rep.captions)} evaluation captions × {plan.eval_seeds} pictures). Spread: ± one standard "
             "deviation over seeds. \"Holds\" is computed from the figures (toyworld/report.py): a difference "
             "counts only when it is larger than both spreads together.", ""]
    lines += ["## The papers' claims", "", "| paper | claim | measured here | holds |", "|---|---|---|---|"]
    for c in claims(results):
        verdict = {True: "**holds**", False: "**does not hold**", None: "not tested (see measured)"}[c.holds]
        lines.append(f"| {c.paper} | {c.claim} | {c.measured} | {verdict} |")
    lines += ["", "## Every run", "", "| run | learned reward | true preference | text alignment | diversity (pixels) "
              "| Vendi | coverage | clutter | touches border | KL (training) |", "|---" * 11 + "|"]
    for label in labels:
        cells = [str(stat(results, label, m) or "–") for m in METRICS] + [str(stat(results, label, "train_kl") or "–")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for name in plan.combined_for:
        lines += ["", f"### Combined generation: base → {name}", "",
                  "| setting | learned reward | true preference | text alignment | diversity (pixels) | coverage |",
                  "|---|---|---|---|---|---|"]
        for k in plan.switch_steps:
            label = name if k == 0 else ("base" if k >= COMMON["num_steps"] else f"{name} combined")
            kk = None if k == 0 or k >= COMMON["num_steps"] else k
            cells = [str(stat(results, label, m, k=kk) or "–") for m in ("proxy", "true", "aligned", "diversity", "coverage")]
            lines.append(f"| k = {k} of {COMMON['num_steps']} | " + " | ".join(cells) + " |")
        for p in plan.blend_powers:
            cells = [str(stat(results, f"{name} blend", m, power=p) or "–")
                     for m in ("proxy", "true", "aligned", "diversity", "coverage")]
            lines.append(f"| blend p = {p:g} | " + " | ".join(cells) + " |")
    # plots: mean over seeds per setting
    points = []
    for r in results:
        key = (r.label, r.k, r.power)
        if key not in [p[0] for p in points]:
            points.append((key, stat(results, r.label, "diversity", k=r.k, power=r.power),
                           stat(results, r.label, "proxy", k=r.k, power=r.power),
                           stat(results, r.label, "true", k=r.k, power=r.power)))
    names = [_ascii(r.label.replace(" combined", f" k{r.k}") if r.k is not None else
                    r.label.replace(" blend", f" p{r.power:g}") if r.power is not None else r.label)
             for r in [next(x for x in results if (x.label, x.k, x.power) == key) for key, *_ in points]]
    for y_index, y_name, fname in ((2, "learned reward", "tradeoff_reward.png"), (3, "true preference", "tradeoff_true.png")):
        img = tradeoff_plot([p[1].mean for p in points], [p[y_index].mean for p in points], names,
                            x_label="diversity (1 - mean pixel cosine)", y_label=y_name,
                            title=f"Toy world: {y_name} against diversity", width=900, height=600)
        img.save(os.path.join(images_dir, fname))
        lines += ["", f"![{y_name} against diversity]({images_rel}/{fname})"]
    panels = [(key, grid(imgs, rep.captions, plan.eval_seeds)) for key, imgs in rep.grids.items()
              if key in ("base", "ReFL", "ImageReFL", "SQDF") or key.startswith("ReFL combined k=")]
    if panels:
        strip = labelled_strip([(_ascii(k), p) for k, p in panels[:6]])
        strip.save(os.path.join(images_dir, "grids.png"))
        lines += ["", "## Pictures", "", "The same captions (rows) and seeds (columns) for each model: "
                  + "; ".join(f"row {i + 1}: \"{c}\"" for i, c in enumerate(rep.captions[:4])) + ".", "",
                  f"![sample grids]({images_rel}/grids.png)"]
    figs = manifest.get("figures", {})
    lines += ["", "## The world these figures come from", "",
              f"Recipe hash `{manifest['hash']}`; built in {manifest['seconds']['total'] / 60:.1f} min "
              "(toyworld/build.py). " + ", ".join(f"{k}: {v}" for k, v in figs.items() if not isinstance(v, dict))]
    return "\n".join(lines) + "\n"
