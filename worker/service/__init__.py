"""The loop: entries -> units and lanes -> executor -> replies; start-up, shutdown."""
