"""Looking at a store: what it holds, per-case pictures and viewers, statistics per teacher."""
