"""The demonstration: a sorting task with a known right answer (`tasks`), and `dpo-fast demo` (`run`): SFT of
a tiny model, DPO on its own mistakes, accuracy before and after. Offline, CPU, minutes."""
