"""Call-count tests: poolguard's own cost per checkout and per request, pinned (see call_counts.txt)."""
