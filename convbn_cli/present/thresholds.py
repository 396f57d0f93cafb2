"""The |gamma| thresholds inspect-bn and diagnose judge BN channels by (no NumPy: the CLI shows them in --help)."""

# A channel whose |gamma| is below this passes on (almost) only a constant: counted dead by inspect-bn's summary
# and by diagnose, and Network Slimming's usual first pruning threshold.
DEAD_GAMMA = 1e-2
RANK_THRESHOLDS = (0.01, 0.05, 0.1)  # inspect-bn --rank: the share of channels below each |gamma|
