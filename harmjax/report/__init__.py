"""The end-to-end report: plots of pruning sweeps and of category-mask matrices (`plots`)."""
