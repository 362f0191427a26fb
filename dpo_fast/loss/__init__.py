"""The loss core: the DPO loss formulas on [B] log-prob vectors, the fused log-prob ops per backend
(`ops/`), the functional API and its Module, input validation, and the float64 oracle the tests
compare every fast path with. Imports nothing from the rest of the package."""
