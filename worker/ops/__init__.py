"""The operator's surface: commands, metrics and health, logs, stats."""
