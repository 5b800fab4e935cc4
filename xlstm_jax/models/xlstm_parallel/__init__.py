"""The xLSTM model family whose mLSTM layers process a whole sequence in parallel (chunkwise)."""
