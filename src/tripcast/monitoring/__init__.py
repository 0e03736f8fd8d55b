"""Monitoring: windows of logged predictions against the champion's reference, alerts, automation policy."""
