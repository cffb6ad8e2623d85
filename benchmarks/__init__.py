"""The benchmark and the planner's checks: users of the library, over its config knobs. Run
them from the repository root:

    python3 -m benchmarks.bench --quick          # peak memory and step of every plan (CPU smoke run)
    python3 -m benchmarks.profile --quick --profile "eager block"   # where one row's step goes
    python3 -m benchmarks.loss_kernels --quick   # the lean loss against fused kernels, alone
    python3 -m benchmarks.plans --plans batch,budget --against out/bench/bench.json
    python3 -m benchmarks.plan_costs --report out/bench/bench.json --write_costs gpt2

rows.py says what a row is and runs one; reports.py reads and writes bench.json and its table.
"""
