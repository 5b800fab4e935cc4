"""The mLSTM block: its layer, cell and backends."""
