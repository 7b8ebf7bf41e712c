"""What Spark's physical plan says about how a DataFrame's rows are partitioned."""

from __future__ import annotations

from pyspark.sql import DataFrame


def hash_partitioned_by(df: DataFrame, column: str) -> bool:
    """True when the plan hash-partitions ``df`` by exactly ``column``: all rows with one value of it
    are then in one partition.

    Reads the physical plan (planning only, no job). Used to skip a shuffle that an earlier stage
    already did, and to do it whenever something in between (a sort-merge join, say) moved the rows.
    Under adaptive query execution the partitioning is decided at run time: the answer is False.
    """
    plan = df._jdf.queryExecution().executedPlan()
    part = plan.outputPartitioning()
    if part.getClass().getSimpleName() != "HashPartitioning" or part.expressions().size() != 1:
        return False
    expr = part.expressions().apply(0)
    if expr.getClass().getSimpleName() != "AttributeReference":
        return False
    out = plan.output()
    for i in range(out.size()):
        attr = out.apply(i)
        if attr.name() == column:
            return attr.exprId().id() == expr.exprId().id()
    return False
