"""`jaxserve bench serve | generate | throughput`: a server under load (any OpenAI-compatible URL), and the
engine's single-stream decode and offline throughput in this process; each writes JSON, prints a
table and draws PNG plots (matplotlib: `pip install 'jaxserve[bench]'`)."""
