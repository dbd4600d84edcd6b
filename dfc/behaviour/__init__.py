"""What a feature makes its model do: removal and cross-model divergence, steering sweeps, steering transfer.
Imports `dfc` core and `dfc.lm` only."""
