"""`tandem loadtest`: drive a tandem cluster's gRPC API with realistic load and report.

    arrivals.py   when requests come (Poisson, gamma, constant; steps and ramps)
    workloads.py  what they say (synthetic lengths, shared prefixes, agentic loops,
                  Mooncake trace replay, multi-turn chat sessions)
    driver.py     sends them (open loop, fixed concurrency, chat sessions), bounded
    replicas.py   replica counts per pool over time, from the Redis registry
    report.py     percentiles, goodput, cache hits, errors; JSON, PNG plots, HTML
    cli.py        the command line
"""
