//! The workload's SQL: joins the input batch with its lookup tables and computes derived
//! features, e.g.
//!
//! ```sql
//! SELECT t.row_id, t.amount / c.avg_amount_30d AS amount_to_card_avg, ...
//! FROM input t LEFT JOIN card c ON t.row_id = c.row_id
//! ```
//!
//! Why plan once: planning a statement costs ~1–2 ms whatever the batch size, executing a
//! ready physical plan ~0.1 ms (measured here with DataFusion 55), and the budget per
//! transaction is a few milliseconds. So the statement is planned once per workload against
//! tables whose scans are [`CurrentBatchExec`] leaves. For each batch the plan is copied with
//! those leaves bound to the batch's tables and every other operator's state reset — a hash
//! join caches its build side, and re-executing it unreset would join the previous batch.
//! Dynamic filter pushdown is disabled because a plan that uses it cannot be re-executed.
//!
//! Joins on `row_id` between the batch's tables, which are aligned row for row, are then
//! replaced by operators that put the tables side by side instead of hashing them (see
//! [`crate::row_aligned`]); the hash-join plan is kept for batches whose tables are not aligned.
//! In that rewritten plan DataFusion's projections also give way to ones without per-execution
//! metrics (see [`crate::projection`]); the hash-join plan keeps DataFusion's own, as the
//! reference the rewritten one is tested against.
//!
//! A rewritten plan made only of operators known to keep no state between executions (the
//! leaves, row-aligned joins, projections, cooperative wrappers) is not copied per batch at
//! all: its leaves read the batch's tables from a slot the plan shares ([`BoundTables`]),
//! filled while the plan's streams are instantiated. Copying the tree rebuilt every operator
//! through `with_new_children`, which recomputes its properties: 78 of the join's 359
//! allocations per batch (`tests/tests/allocations.rs`); the rest are its execution.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use arrow::array::{Array, UInt32Array};
use arrow::compute::{concat_batches, take_record_batch};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::datasource::TableType;
use datafusion::error::DataFusionError;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::Expr;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::coop::CooperativeExec;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::memory::MemoryStream;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::{
    collect, common, execute_stream, DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning,
    PlanProperties, ReplaceChildrenOptions, SendableRecordBatchStream,
};
use datafusion::prelude::{SessionConfig, SessionContext};
use verdict_schemas::columns::ROW_ID;

use crate::projection::{drop_projection_metrics, PlainProjectionExec};
use crate::row_aligned::{align_row_id_joins, tables_are_row_aligned, RowAlignedJoinExec};
use crate::{FeatureError, Result};

/// Name of the input table in the workload SQL.
pub const INPUT_TABLE: &str = "input";

/// A workload's SQL, planned once, executed per batch.
pub struct SqlJoin {
    /// The plan as DataFusion built it (hash joins): correct for any tables.
    pub(crate) plan: Arc<dyn ExecutionPlan>,
    /// The same plan with its `row_id` joins replaced by row-aligned ones, when it has any:
    /// used for batches whose tables all carry `row_id` 0..n.
    pub(crate) aligned_plan: Option<Arc<dyn ExecutionPlan>>,
    /// Whether `aligned_plan` keeps no state between executions, so it runs as it is with its
    /// leaves reading `bound` instead of being copied and reset per batch.
    aligned_plan_is_stateless: bool,
    /// The tables of the batch being instantiated, for the leaves of a stateless plan.
    bound: Arc<BoundTables>,
    task_ctx: Arc<TaskContext>,
    output_schema: SchemaRef,
    /// Schemas of the tables, in binding order: `input`, then each lookup.
    table_schemas: Vec<SchemaRef>,
}

impl fmt::Debug for SqlJoin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlJoin")
            .field("output_schema", &self.output_schema)
            .finish_non_exhaustive()
    }
}

impl SqlJoin {
    /// Plans `sql` over the table `input` and one table per lookup (`(name, schema)`, in the
    /// order their batches will be passed to [`SqlJoin::run`]). The output must contain
    /// `row_id`, which is how its rows are matched back to the input.
    pub async fn plan(
        sql: &str,
        input_schema: SchemaRef,
        lookups: &[(String, SchemaRef)],
    ) -> Result<Self> {
        let mut config = SessionConfig::new()
            .with_target_partitions(1)
            .with_batch_size(8192);
        config
            .options_mut()
            .optimizer
            .enable_dynamic_filter_pushdown = false;
        let ctx = SessionContext::new_with_config(config);

        let bound = Arc::new(BoundTables::default());
        let mut table_schemas = vec![input_schema.clone()];
        ctx.register_table(
            INPUT_TABLE,
            Arc::new(CurrentBatchTable::new(0, input_schema, Arc::clone(&bound))),
        )?;
        for (index, (name, schema)) in lookups.iter().enumerate() {
            table_schemas.push(schema.clone());
            ctx.register_table(
                name.as_str(),
                Arc::new(CurrentBatchTable::new(
                    index + 1,
                    schema.clone(),
                    Arc::clone(&bound),
                )),
            )?;
        }
        let plan = ctx.sql(sql).await?.create_physical_plan().await?;
        let output_schema = plan.schema();
        if output_schema.index_of(ROW_ID).is_err() {
            return Err(FeatureError::Output(format!(
                "the workload SQL must select `{ROW_ID}` (e.g. `SELECT t.{ROW_ID}, ...`), so its rows can be matched to the input; it selects: {}",
                output_schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")
            )));
        }
        let (aligned, replaced) = align_row_id_joins(Arc::clone(&plan))?;
        let aligned_plan = if replaced > 0 {
            Some(drop_projection_metrics(aligned)?)
        } else {
            None
        };
        let aligned_plan_is_stateless = aligned_plan.as_ref().is_some_and(|plan| {
            plan.properties().partitioning.partition_count() == 1 && is_stateless(plan)
        });
        Ok(Self {
            plan,
            aligned_plan,
            aligned_plan_is_stateless,
            bound,
            task_ctx: ctx.task_ctx(),
            output_schema,
            table_schemas,
        })
    }

    pub fn output_schema(&self) -> &SchemaRef {
        &self.output_schema
    }

    /// Runs the plan over one batch: `tables[0]` is the input, then the lookups in planning
    /// order. Returns exactly one output row per input row, in input order.
    pub async fn run(&self, tables: &[RecordBatch]) -> Result<RecordBatch> {
        let input_rows = self.check_tables(tables)?;
        match &self.aligned_plan {
            Some(aligned) if tables_are_row_aligned(tables, input_rows) => {
                if self.aligned_plan_is_stateless {
                    self.execute_stateless(aligned, tables, input_rows).await
                } else {
                    self.execute(aligned, tables, input_rows).await
                }
            }
            _ => self.execute(&self.plan, tables, input_rows).await,
        }
    }

    /// [`SqlJoin::run`] with DataFusion's hash joins whatever the tables: the reference the
    /// row-aligned plan is tested and measured against.
    pub async fn run_with_hash_joins(&self, tables: &[RecordBatch]) -> Result<RecordBatch> {
        let input_rows = self.check_tables(tables)?;
        self.execute(&self.plan, tables, input_rows).await
    }

    /// Whether the statement's `row_id` joins run without hashing on aligned tables.
    pub fn has_row_aligned_joins(&self) -> bool {
        self.aligned_plan.is_some()
    }

    /// Checks the number of tables; returns the number of input rows.
    fn check_tables(&self, tables: &[RecordBatch]) -> Result<usize> {
        if tables.len() != self.table_schemas.len() {
            return Err(FeatureError::Output(format!(
                "expected {} tables, got {}",
                self.table_schemas.len(),
                tables.len()
            )));
        }
        Ok(tables[0].num_rows())
    }

    pub(crate) async fn execute(
        &self,
        plan: &Arc<dyn ExecutionPlan>,
        tables: &[RecordBatch],
        input_rows: usize,
    ) -> Result<RecordBatch> {
        let bound = Arc::clone(plan)
            .transform_up(|node| {
                if let Some(leaf) = node.downcast_ref::<CurrentBatchExec>() {
                    let batch = tables[leaf.table].clone();
                    Ok(Transformed::yes(Arc::new(leaf.bind(batch)?) as _))
                } else {
                    Ok(Transformed::yes(node.reset_state()?))
                }
            })?
            .data;
        let batches = collect(bound, Arc::clone(&self.task_ctx)).await?;
        let joined = concat_batches(&self.output_schema, &batches)?;
        realign(joined, input_rows)
    }

    /// Runs a plan with no state between executions as it is: its streams are instantiated
    /// with the batch's tables in `bound` (every operator of such a plan instantiates its
    /// children's streams in its own `execute`, so the leaves have read them when
    /// `execute_stream` returns), then collected.
    async fn execute_stateless(
        &self,
        plan: &Arc<dyn ExecutionPlan>,
        tables: &[RecordBatch],
        input_rows: usize,
    ) -> Result<RecordBatch> {
        let stream = self.bound.instantiate(tables, || {
            execute_stream(Arc::clone(plan), Arc::clone(&self.task_ctx))
        })?;
        let batches = common::collect(stream).await?;
        let joined = concat_batches(&self.output_schema, &batches)?;
        realign(joined, input_rows)
    }
}

/// Whether every operator of `plan` is one known to keep nothing from one execution to the
/// next and to instantiate its children's streams inside its own `execute` (not later, as a
/// hash join does with its build side). Anything else, including operators a DataFusion
/// upgrade might add, makes the plan be copied and reset per batch as before.
fn is_stateless(plan: &Arc<dyn ExecutionPlan>) -> bool {
    let known = plan.downcast_ref::<CurrentBatchExec>().is_some()
        || plan.downcast_ref::<RowAlignedJoinExec>().is_some()
        || plan.downcast_ref::<PlainProjectionExec>().is_some()
        || plan.downcast_ref::<ProjectionExec>().is_some()
        || plan.downcast_ref::<CooperativeExec>().is_some();
    known && plan.children().into_iter().all(is_stateless)
}

/// The tables of the batch whose streams are being instantiated, shared by one plan's leaves.
#[derive(Debug, Default)]
pub(crate) struct BoundTables {
    /// Held from filling `tables` to emptying them: two batches run on the same plan at once
    /// (two tasks, two threads) never see each other's tables.
    instantiating: Mutex<()>,
    tables: Mutex<Vec<RecordBatch>>,
}

impl BoundTables {
    /// Calls `instantiate` with `tables` readable by the leaves, and empties them after.
    fn instantiate<T>(&self, tables: &[RecordBatch], instantiate: impl FnOnce() -> T) -> T {
        let _one_batch_at_a_time = self
            .instantiating
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.set(tables);
        let instantiated = instantiate();
        self.set(&[]);
        instantiated
    }

    fn set(&self, tables: &[RecordBatch]) {
        let mut slot = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        slot.clear();
        slot.extend_from_slice(tables);
    }

    /// Table `table` of the batch being instantiated; `None` outside an instantiation.
    fn table(&self, table: usize) -> Option<RecordBatch> {
        self.tables
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(table)
            .cloned()
    }
}

/// Puts the SQL output back in input order, checking it has exactly one row per input row
/// (a join that multiplies or drops rows would otherwise mis-attribute scores).
fn realign(joined: RecordBatch, input_rows: usize) -> Result<RecordBatch> {
    let mismatch = |what: String| {
        FeatureError::Output(format!(
            "the workload SQL must return exactly one row per input row ({input_rows}): {what}"
        ))
    };
    if joined.num_rows() != input_rows {
        return Err(mismatch(format!("it returned {}", joined.num_rows())));
    }
    let row_ids = joined
        .column_by_name(ROW_ID)
        .and_then(|c| c.as_any().downcast_ref::<UInt32Array>())
        .ok_or_else(|| mismatch(format!("`{ROW_ID}` is missing or not UInt32")))?;
    let mut positions = vec![u32::MAX; input_rows];
    let mut in_order = true;
    for (position, row_id) in row_ids.iter().enumerate() {
        let row_id = row_id.ok_or_else(|| mismatch(format!("null `{ROW_ID}`")))? as usize;
        if row_id >= input_rows || positions[row_id] != u32::MAX {
            return Err(mismatch(format!(
                "`{ROW_ID}` {row_id} is out of range or repeated"
            )));
        }
        positions[row_id] = position as u32;
        in_order &= row_id == position;
    }
    if in_order {
        return Ok(joined);
    }
    Ok(take_record_batch(&joined, &UInt32Array::from(positions))?)
}

/// A table whose contents are whatever batch is bound to its scan at execution time.
#[derive(Debug)]
struct CurrentBatchTable {
    table: usize,
    schema: SchemaRef,
    bound: Arc<BoundTables>,
}

impl CurrentBatchTable {
    fn new(table: usize, schema: SchemaRef, bound: Arc<BoundTables>) -> Self {
        Self {
            table,
            schema,
            bound,
        }
    }
}

#[async_trait]
impl TableProvider for CurrentBatchTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(CurrentBatchExec::new(
            self.table,
            Arc::clone(&self.schema),
            projection.cloned(),
            Arc::clone(&self.bound),
        )?))
    }
}

/// Leaf operator: yields the batch bound to it (projected); unbound, the one its plan is
/// being instantiated with ([`BoundTables`]), or nothing outside an instantiation.
#[derive(Debug, Clone)]
pub(crate) struct CurrentBatchExec {
    table: usize,
    projection: Option<Vec<usize>>,
    batch: Option<RecordBatch>,
    bound: Arc<BoundTables>,
    properties: Arc<PlanProperties>,
}

impl CurrentBatchExec {
    fn new(
        table: usize,
        schema: SchemaRef,
        projection: Option<Vec<usize>>,
        bound: Arc<BoundTables>,
    ) -> datafusion::error::Result<Self> {
        let projected = match &projection {
            Some(p) => Arc::new(schema.project(p)?),
            None => schema,
        };
        let properties = PlanProperties::new(
            EquivalenceProperties::new(projected),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Ok(Self {
            table,
            projection,
            batch: None,
            bound,
            properties: Arc::new(properties),
        })
    }

    fn bind(&self, batch: RecordBatch) -> datafusion::error::Result<Self> {
        Ok(Self {
            batch: Some(self.project(batch)?),
            ..self.clone()
        })
    }

    fn project(&self, batch: RecordBatch) -> datafusion::error::Result<RecordBatch> {
        Ok(match &self.projection {
            Some(p) => batch.project(p)?,
            None => batch,
        })
    }
}

impl DisplayAs for CurrentBatchExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "CurrentBatchExec: table={}", self.table)
    }
}

impl ExecutionPlan for CurrentBatchExec {
    fn name(&self) -> &str {
        "CurrentBatchExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> datafusion::error::Result<TreeNodeRecursion>,
    ) -> datafusion::error::Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn with_new_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> datafusion::error::Result<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "CurrentBatchExec has one partition, asked for {partition}"
            )));
        }
        let batch = match &self.batch {
            Some(batch) => Some(batch.clone()),
            None => self
                .bound
                .table(self.table)
                .map(|batch| self.project(batch))
                .transpose()?,
        };
        let batches = batch.into_iter().collect();
        Ok(Box::pin(MemoryStream::try_new(
            batches,
            self.properties.eq_properties.schema().clone(),
            None,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::assert_batches_eq;

    fn input_schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new(ROW_ID, DataType::UInt32, false),
            Field::new("card_id", DataType::Utf8, false),
            Field::new("amount", DataType::Float64, false),
        ]))
    }

    fn card_schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new(ROW_ID, DataType::UInt32, false),
            Field::new("card_id", DataType::Utf8, true),
            Field::new("avg_amount", DataType::Float64, true),
        ]))
    }

    fn tables(cards: &[&str], amounts: &[f64], avgs: &[Option<f64>]) -> Vec<RecordBatch> {
        let n = cards.len() as u32;
        let input = RecordBatch::try_new(
            input_schema(),
            vec![
                Arc::new(UInt32Array::from_iter_values(0..n)),
                Arc::new(StringArray::from(cards.to_vec())),
                Arc::new(Float64Array::from(amounts.to_vec())),
            ],
        )
        .unwrap();
        let card = RecordBatch::try_new(
            card_schema(),
            vec![
                Arc::new(UInt32Array::from_iter_values(0..n)),
                Arc::new(StringArray::from(cards.to_vec())),
                Arc::new(Float64Array::from(avgs.to_vec())),
            ],
        )
        .unwrap();
        vec![input, card]
    }

    const SQL: &str = "SELECT t.row_id, t.card_id, t.amount / c.avg_amount AS ratio \
                       FROM input t LEFT JOIN card c ON t.row_id = c.row_id";

    /// Batches joined at the same time on one plan, from several threads, each get their own
    /// rows: the tables a stateless plan's leaves read are never another batch's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_batches_on_one_plan_each_get_their_own_rows() {
        let join = Arc::new(
            SqlJoin::plan(SQL, input_schema(), &[("card".into(), card_schema())])
                .await
                .unwrap(),
        );
        assert!(join.aligned_plan_is_stateless);
        let runs = (0..64).map(|batch| {
            let join = Arc::clone(&join);
            tokio::spawn(async move {
                // Batch b has b % 7 + 1 rows; row i's ratio is b * 100 + i.
                let rows = batch % 7 + 1;
                let cards: Vec<String> = (0..rows).map(|i| format!("b{batch}r{i}")).collect();
                let cards: Vec<&str> = cards.iter().map(String::as_str).collect();
                let amounts: Vec<f64> = (0..rows).map(|i| (batch * 100 + i) as f64).collect();
                let out = join
                    .run(&tables(&cards, &amounts, &vec![Some(1.0); rows]))
                    .await
                    .unwrap();
                let ratios = out
                    .column_by_name("ratio")
                    .unwrap()
                    .as_any()
                    .downcast_ref::<Float64Array>()
                    .unwrap()
                    .values()
                    .to_vec();
                (amounts, ratios)
            })
        });
        for run in futures::future::join_all(runs).await {
            let (amounts, ratios) = run.unwrap();
            assert_eq!(ratios, amounts);
        }
    }

    #[tokio::test]
    async fn planned_once_and_re_executed_on_batches_with_different_contents() {
        let join = SqlJoin::plan(SQL, input_schema(), &[("card".into(), card_schema())])
            .await
            .unwrap();
        // So the runs below go through the plan that is not copied per batch.
        assert!(join.aligned_plan_is_stateless);

        let first = join
            .run(&tables(
                &["a", "b", "c"],
                &[10.0, 30.0, 5.0],
                &[Some(5.0), None, Some(10.0)],
            ))
            .await
            .unwrap();
        assert_batches_eq!(
            [
                "+--------+---------+-------+",
                "| row_id | card_id | ratio |",
                "+--------+---------+-------+",
                "| 0      | a       | 2.0   |",
                "| 1      | b       |       |",
                "| 2      | c       | 0.5   |",
                "+--------+---------+-------+",
            ],
            &[first]
        );

        // Different size and contents: a stale hash-join build side would show batch 1's values.
        let second = join
            .run(&tables(&["x", "y"], &[8.0, 9.0], &[Some(2.0), Some(3.0)]))
            .await
            .unwrap();
        assert_batches_eq!(
            [
                "+--------+---------+-------+",
                "| row_id | card_id | ratio |",
                "+--------+---------+-------+",
                "| 0      | x       | 4.0   |",
                "| 1      | y       | 3.0   |",
                "+--------+---------+-------+",
            ],
            &[second]
        );
    }

    #[tokio::test]
    async fn output_without_row_id_is_refused_at_planning() {
        let err = SqlJoin::plan("SELECT amount FROM input", input_schema(), &[])
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("row_id"), "{err}");
    }

    #[tokio::test]
    async fn a_statement_that_drops_rows_is_an_error_not_a_misalignment() {
        let join = SqlJoin::plan(
            "SELECT row_id FROM input WHERE amount > 1",
            input_schema(),
            &[],
        )
        .await
        .unwrap();
        let err = join
            .run(&tables(&["a", "b"], &[0.5, 3.0], &[None, None])[..1])
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("exactly one row per input row"), "{err}");
    }

    #[test]
    fn realign_restores_input_order() {
        let schema = Arc::new(Schema::new(vec![
            Field::new(ROW_ID, DataType::UInt32, false),
            Field::new("v", DataType::Float64, false),
        ]));
        let shuffled = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(UInt32Array::from(vec![2, 0, 1])),
                Arc::new(Float64Array::from(vec![2.0, 0.0, 1.0])),
            ],
        )
        .unwrap();
        let aligned = realign(shuffled, 3).unwrap();
        let v = aligned
            .column(1)
            .as_any()
            .downcast_ref::<Float64Array>()
            .unwrap();
        assert_eq!(v.values(), &[0.0, 1.0, 2.0]);
    }
}
