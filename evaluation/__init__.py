"""Long-context evaluation: eval loss by position and passkey retrieval, and their reports."""
