"""xLSTM models and the mLSTM backends they select kernels through."""
