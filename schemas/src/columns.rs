//! Column names that more than one stage relies on.

/// Position of a row in its micro-batch (`UInt32`). The source adds it to every decoded batch;
/// lookup tables carry it too, so the workload SQL joins lookups to the input with
/// `LEFT JOIN card c ON t.row_id = c.row_id`, and the scorer re-aligns the SQL output to the
/// input rows with it, whatever order the join produced.
pub const ROW_ID: &str = "row_id";
