"""What a model does: a feature's removal and cross-model divergence, steering sweeps, steering transfer, and the
behaviour-first scan of what one model says that the other would not, with its attribution to features.
Imports `dfc` core and `dfc.lm` only."""
