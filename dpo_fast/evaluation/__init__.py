"""Evaluation: DPO implicit rewards, scores and rankings of models on preference pairs (`rewards`), the
beta sweep (`sweep`) and preference-pair synthesis (`synth`). Imports the training layer and below.

The rewards API is importable from here (`dpo_fast.evaluation.implicit_rewards`), loaded on first use.
"""

_REWARDS_API = (
    "Interval", "vocabulary_of", "check_same_vocabulary", "pair_token_logps", "implicit_rewards", "PreparedPairs",
    "prepare_pairs", "wilson_interval", "bootstrap_means", "percentile_interval", "win_indicators", "bradley_terry",
    "ScoreResult", "score_pairs", "RankResult", "rank_models", "write_scores", "rank_chart_png", "write_rank_outputs",
)


def __getattr__(name: str):
    if name in _REWARDS_API:
        from . import rewards

        value = getattr(rewards, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dpo_fast.evaluation' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_REWARDS_API))
