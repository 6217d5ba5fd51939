"""Model registry behind ``-n`` (filled as the heads land)."""
