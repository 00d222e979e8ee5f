"""Differentiable reward models that load the official checkpoints offline.

    from rewardtune.rewards import load_reward_model
    reward = load_reward_model("models/reward_models/ImageReward.pt")
    scores = reward.score(images, "a photo of a cat")   # images: (B, H, W, 3) in [0, 1]
"""
from .base import PreferenceMLP, RewardModel, match_prompts
from .checkpoint import RewardModelError, detect_reward_type, read_state_dict
from .loader import REWARD_TYPES, load_reward_model
from .preprocess import RewardInputError, as_rgb_bchw, clip_pixels

__all__ = ["PreferenceMLP", "RewardModel", "RewardModelError", "RewardInputError", "REWARD_TYPES",
           "as_rgb_bchw", "clip_pixels", "detect_reward_type", "load_reward_model", "match_prompts",
           "read_state_dict"]
