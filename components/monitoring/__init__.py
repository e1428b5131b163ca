"""The monitoring family: the drift stage, its checks and the on-call report."""
