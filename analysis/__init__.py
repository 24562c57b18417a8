"""Learning-rate insight: pure functions over recorded series (no torch, no database, no web code).

`smoothing` (the debiased EMA every chart and score uses), `runs` (one run's scores and verdict),
`sweeps` (ranking runs across learning rates) and `range_test` (LR range-test rules).
"""
