"""Sampling algorithms: combined generation (base → tuned handoff) and the AIG blend baseline."""
