"""Blocks of the xLSTM model."""
