"""Serving cost per token from the machine's hourly price and the measured decode throughput."""

from __future__ import annotations


def usd_per_1m_tokens(usd_per_hour: float, tokens_per_s: float) -> float:
    """US dollars per million generated tokens: a machine at ``usd_per_hour`` that decodes ``tokens_per_s``."""
    if usd_per_hour < 0 or tokens_per_s <= 0:
        raise ValueError(
            f"cost needs usd_per_hour >= 0 and a positive throughput, got {usd_per_hour} $/h and {tokens_per_s} tok/s"
        )
    return usd_per_hour / (tokens_per_s * 3600) * 1e6
