"""The MTA-facing side: listeners and one session per MTA connection."""
