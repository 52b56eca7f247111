"""The three signals beside the answers: metrics (service/metrics.py), traces and structured
logs. Each is configured once, at start, from the standard variables or VIT_* settings."""
