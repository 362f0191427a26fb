"""Evaluation: DPO implicit rewards, scores and rankings of models on preference pairs (`rewards`), the
beta sweep (`sweep`) and preference-pair synthesis (`synth`). Imports the training layer and below.

The rewards API is importable from here (`dpo_fast.evaluation.implicit_rewards`), loaded on first use.
"""

from .._lazy import lazy_exports as _lazy_exports

_REWARDS_API = (
    "Interval", "vocabulary_of", "check_same_vocabulary", "pair_token_logps", "implicit_rewards", "PreparedPairs",
    "prepare_pairs", "wilson_interval", "bootstrap_means", "percentile_interval", "win_indicators", "bradley_terry",
    "ScoreResult", "score_pairs", "RankResult", "rank_models", "write_scores", "rank_chart_png", "write_rank_outputs",
)


__getattr__, __dir__ = _lazy_exports(__name__, dict.fromkeys(_REWARDS_API, "dpo_fast.evaluation.rewards"))
