//! Joins on `row_id` between tables that are aligned to the input rows, without hashing.
//!
//! Every table a workload's SQL sees has one row per input row, in input order: the input
//! batch itself and each lookup table (row *i* holds the features of input row *i*, see
//! [`crate::lookup`]), all with `row_id` = 0, 1, …, n−1. An equi-join on `row_id` between
//! two such tables pairs row *i* with row *i*, so its result is the two tables side by side.
//! DataFusion cannot know that and builds a hash table on every join of every batch: three
//! builds and probes per batch for the fraud workload, the largest part of the SQL's cost.
//!
//! [`align_row_id_joins`] replaces such a `HashJoinExec` by a [`RowAlignedJoinExec`] that puts
//! the two sides' columns side by side. It only does so where it can prove the pairing: both
//! join keys must be `row_id` columns passed through unchanged from a table scan (through
//! projections, cooperative-yield wrappers and other aligned joins only: a filter, an aggregate or a computed key breaks
//! the proof and the hash join stays), the join has no extra filter and
//! no limit, and its type keeps every row of both sides when the keys pair up (inner, left,
//! right, full). The proof assumes the tables really are aligned, so [`crate::SqlJoin`] checks
//! that every batch's tables carry `row_id` 0..n before it uses the rewritten plan, and runs
//! the hash-join plan otherwise; the operator also checks that the keys it pairs are equal.

use std::fmt;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, UInt32Array};
use arrow::compute::concat_batches;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::JoinType;
use datafusion::error::DataFusionError;
use datafusion::execution::TaskContext;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::common::collect;
use datafusion::physical_plan::coop::CooperativeExec;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::joins::HashJoinExec;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
    ReplaceChildrenOptions, SendableRecordBatchStream,
};
use verdict_schemas::columns::ROW_ID;

use crate::join::CurrentBatchExec;

/// Rewrites every hash join on `row_id` between aligned inputs into a [`RowAlignedJoinExec`].
/// Returns the rewritten plan and how many joins were replaced.
pub(crate) fn align_row_id_joins(
    plan: Arc<dyn ExecutionPlan>,
) -> datafusion::error::Result<(Arc<dyn ExecutionPlan>, usize)> {
    let mut replaced = 0;
    // Bottom up, so a join whose input is an already replaced join is recognised as aligned.
    let plan = plan
        .transform_up(|node| {
            let Some(join) = node.downcast_ref::<HashJoinExec>() else {
                return Ok(Transformed::no(node));
            };
            match RowAlignedJoinExec::try_from_hash_join(join)? {
                Some(aligned) => {
                    replaced += 1;
                    Ok(Transformed::yes(Arc::new(aligned) as Arc<dyn ExecutionPlan>))
                }
                None => Ok(Transformed::no(node)),
            }
        })?
        .data;
    Ok((plan, replaced))
}

/// Whether every table's `row_id` column is 0, 1, …, `rows`−1: the precondition of the
/// rewritten plan. A table without a `row_id` column of the expected type fails it.
pub(crate) fn tables_are_row_aligned(tables: &[RecordBatch], rows: usize) -> bool {
    tables.iter().all(|table| {
        table.num_rows() == rows
            && table
                .column_by_name(ROW_ID)
                .and_then(|c| c.as_any().downcast_ref::<UInt32Array>())
                .is_some_and(|ids| {
                    ids.null_count() == 0
                        && ids
                            .values()
                            .iter()
                            .enumerate()
                            .all(|(i, id)| *id as usize == i)
                })
    })
}

/// Whether output column `index` of `plan` is, row for row, a table scan's `row_id`, with the
/// scan's rows neither dropped, repeated nor reordered on the way.
fn passes_row_id_through(plan: &Arc<dyn ExecutionPlan>, index: usize) -> bool {
    if plan.downcast_ref::<CurrentBatchExec>().is_some() {
        return plan
            .schema()
            .fields()
            .get(index)
            .is_some_and(|f| f.name() == ROW_ID);
    }
    if let Some(projection) = plan.downcast_ref::<ProjectionExec>() {
        return projection.expr().get(index).is_some_and(|p| {
            p.expr
                .downcast_ref::<Column>()
                .is_some_and(|c| passes_row_id_through(projection.input(), c.index()))
        });
    }
    // DataFusion wraps scans in it to yield to the runtime now and then; it passes batches on.
    if let Some(cooperative) = plan.downcast_ref::<CooperativeExec>() {
        return passes_row_id_through(cooperative.input(), index);
    }
    if let Some(join) = plan.downcast_ref::<RowAlignedJoinExec>() {
        let Some(&combined) = join.projection.get(index) else {
            return false;
        };
        let left_width = join.left.schema().fields().len();
        return if combined < left_width {
            passes_row_id_through(&join.left, combined)
        } else {
            passes_row_id_through(&join.right, combined - left_width)
        };
    }
    false
}

/// An equi-join on `row_id` of two inputs aligned to the same input rows: row *i* of the
/// output is row *i* of the left input beside row *i* of the right one (then projected, as
/// the hash join it replaces was).
#[derive(Debug)]
pub(crate) struct RowAlignedJoinExec {
    left: Arc<dyn ExecutionPlan>,
    right: Arc<dyn ExecutionPlan>,
    /// Index of the `row_id` key in each input's output.
    left_key: usize,
    right_key: usize,
    /// Output columns as indices into the left columns followed by the right ones.
    projection: Vec<usize>,
    properties: Arc<PlanProperties>,
}

impl RowAlignedJoinExec {
    /// The aligned equivalent of `join`, or `None` where the pairing cannot be proven.
    fn try_from_hash_join(join: &HashJoinExec) -> datafusion::error::Result<Option<Self>> {
        let keeps_every_row = matches!(
            join.join_type,
            JoinType::Inner | JoinType::Left | JoinType::Right | JoinType::Full
        );
        if !keeps_every_row || join.filter.is_some() || join.fetch().is_some() {
            return Ok(None);
        }
        let [(left_key, right_key)] = join.on.as_slice() else {
            return Ok(None);
        };
        let (Some(left_key), Some(right_key)) = (
            left_key.downcast_ref::<Column>(),
            right_key.downcast_ref::<Column>(),
        ) else {
            return Ok(None);
        };
        if !passes_row_id_through(&join.left, left_key.index())
            || !passes_row_id_through(&join.right, right_key.index())
        {
            return Ok(None);
        }
        let width = join.left.schema().fields().len() + join.right.schema().fields().len();
        let projection = match &join.projection {
            Some(p) => p.to_vec(),
            None => (0..width).collect(),
        };
        Ok(Some(Self::new(
            Arc::clone(&join.left),
            Arc::clone(&join.right),
            left_key.index(),
            right_key.index(),
            projection,
            // The hash join's output schema: its nullability (the outer side of an outer join
            // becomes nullable) and names are what the operators above were planned against.
            join.schema(),
        )))
    }

    fn new(
        left: Arc<dyn ExecutionPlan>,
        right: Arc<dyn ExecutionPlan>,
        left_key: usize,
        right_key: usize,
        projection: Vec<usize>,
        schema: SchemaRef,
    ) -> Self {
        let properties = PlanProperties::new(
            EquivalenceProperties::new(schema),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Final,
            Boundedness::Bounded,
        );
        Self {
            left,
            right,
            left_key,
            right_key,
            projection,
            properties: Arc::new(properties),
        }
    }
}

impl DisplayAs for RowAlignedJoinExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "RowAlignedJoinExec: on=({}@{}, {}@{})",
            ROW_ID, self.left_key, ROW_ID, self.right_key
        )
    }
}

impl ExecutionPlan for RowAlignedJoinExec {
    fn name(&self) -> &str {
        "RowAlignedJoinExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.left, &self.right]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> datafusion::error::Result<TreeNodeRecursion>,
    ) -> datafusion::error::Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let [left, right]: [Arc<dyn ExecutionPlan>; 2] =
            children.try_into().map_err(|c: Vec<_>| {
                DataFusionError::Internal(format!(
                    "RowAlignedJoinExec has two children, got {}",
                    c.len()
                ))
            })?;
        Ok(Arc::new(Self {
            left,
            right,
            left_key: self.left_key,
            right_key: self.right_key,
            projection: self.projection.clone(),
            properties: Arc::clone(&self.properties),
        }))
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(
                datafusion::physical_plan::ChildrenPropertiesMode::Recompute,
            ),
        )
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> datafusion::error::Result<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "RowAlignedJoinExec has one partition, asked for {partition}"
            )));
        }
        let left = self.left.execute(0, Arc::clone(&context))?;
        let right = self.right.execute(0, context)?;
        let (left_schema, right_schema) = (self.left.schema(), self.right.schema());
        let (left_key, right_key) = (self.left_key, self.right_key);
        let projection = self.projection.clone();
        let schema = self.schema();
        let output_schema = Arc::clone(&schema);
        let joined = async move {
            let left = concat_batches(&left_schema, &collect(left).await?)?;
            let right = concat_batches(&right_schema, &collect(right).await?)?;
            // Cheap, and the only thing standing between a broken precondition and scores
            // attributed to the wrong transactions.
            if left.num_rows() != right.num_rows()
                || left.column(left_key).as_ref() != right.column(right_key).as_ref()
            {
                return Err(DataFusionError::Execution(format!(
                    "row-aligned join: the two sides' `{ROW_ID}` columns differ ({} and {} rows)",
                    left.num_rows(),
                    right.num_rows()
                )));
            }
            let columns: Vec<ArrayRef> = projection
                .iter()
                .map(|&i| {
                    if i < left.num_columns() {
                        Arc::clone(left.column(i))
                    } else {
                        Arc::clone(right.column(i - left.num_columns()))
                    }
                })
                .collect();
            Ok(RecordBatch::try_new(output_schema, columns)?)
        };
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            schema,
            futures::stream::once(joined),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::util::pretty::pretty_format_batches;
    use datafusion::physical_plan::displayable;
    use proptest::prelude::*;

    use crate::SqlJoin;

    fn schema(fields: &[(&str, DataType)]) -> SchemaRef {
        let mut all = vec![Field::new(ROW_ID, DataType::UInt32, false)];
        all.extend(fields.iter().map(|(n, t)| Field::new(*n, t.clone(), true)));
        Arc::new(Schema::new(all))
    }

    /// A card id, an amount, and one value for each of the three lookup tables.
    type Row = (String, Option<f64>, [Option<f64>; 3]);

    fn input_schema() -> SchemaRef {
        schema(&[("card_id", DataType::Utf8), ("amount", DataType::Float64)])
    }

    fn lookup_schema() -> SchemaRef {
        schema(&[("card_id", DataType::Utf8), ("avg", DataType::Float64)])
    }

    fn lookups() -> Vec<(String, SchemaRef)> {
        ["card", "merchant", "velocity"]
            .iter()
            .map(|n| (n.to_string(), lookup_schema()))
            .collect()
    }

    /// One row per `(card, amount, avgs)`; `row_ids` gives each table's `row_id` column.
    fn tables(rows: &[Row], row_ids: &[u32]) -> Vec<RecordBatch> {
        let ids = || Arc::new(UInt32Array::from(row_ids.to_vec())) as ArrayRef;
        let cards = || {
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.0.as_str()),
            )) as ArrayRef
        };
        let mut out = vec![RecordBatch::try_new(
            input_schema(),
            vec![
                ids(),
                cards(),
                Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.1))),
            ],
        )
        .unwrap()];
        for table in 0..3 {
            out.push(
                RecordBatch::try_new(
                    lookup_schema(),
                    vec![
                        ids(),
                        cards(),
                        Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.2[table]))),
                    ],
                )
                .unwrap(),
            );
        }
        out
    }

    /// The shape of the example fraud statement: three LEFT JOINs on `row_id`, derived columns.
    const THREE_LEFT_JOINS: &str = "SELECT t.row_id, t.card_id, t.amount / c.avg AS ratio, \
         CASE WHEN m.card_id IS NULL THEN NULL ELSE m.avg END AS m_avg, \
         v.avg + c.avg AS total, coalesce(v.card_id, 'none') AS v_card \
         FROM input t \
         LEFT JOIN card c ON t.row_id = c.row_id \
         LEFT JOIN merchant m ON t.row_id = m.row_id \
         LEFT JOIN velocity v ON t.row_id = v.row_id";

    /// Other join types, keys written the other way round, a join on a join's output.
    const MIXED_JOINS: &str = "SELECT t.row_id, c.avg AS c_avg, m.avg AS m_avg, v.card_id \
         FROM input t \
         JOIN card c ON c.row_id = t.row_id \
         RIGHT JOIN merchant m ON t.row_id = m.row_id \
         FULL JOIN velocity v ON m.row_id = v.row_id";

    async fn planned(sql: &str) -> SqlJoin {
        SqlJoin::plan(sql, input_schema(), &lookups())
            .await
            .unwrap()
    }

    fn plan_text(join: &SqlJoin, aligned: bool) -> String {
        let plan = if aligned {
            join.aligned_plan.as_ref().expect("an aligned plan")
        } else {
            &join.plan
        };
        displayable(plan.as_ref()).indent(false).to_string()
    }

    #[tokio::test]
    async fn every_row_id_join_of_the_fraud_shape_is_replaced() {
        for sql in [THREE_LEFT_JOINS, MIXED_JOINS] {
            let join = planned(sql).await;
            let hashed = plan_text(&join, false);
            assert!(join.has_row_aligned_joins(), "{hashed}");
            let aligned = plan_text(&join, true);
            assert_eq!(hashed.matches("HashJoinExec").count(), 3, "{hashed}");
            assert!(!aligned.contains("HashJoinExec"), "{aligned}");
            assert_eq!(
                aligned.matches("RowAlignedJoinExec").count(),
                3,
                "{aligned}"
            );
        }
    }

    #[tokio::test]
    async fn joins_whose_pairing_cannot_be_proven_keep_hashing() {
        // A key that is not a scanned `row_id` passed through unchanged, a join on another
        // column, a filtered side: none of them pairs row i with row i.
        for sql in [
            "SELECT t.row_id, c.avg FROM input t \
             LEFT JOIN (SELECT row_id + 1 AS row_id, avg FROM card) c ON t.row_id = c.row_id",
            "SELECT t.row_id, c.avg FROM input t LEFT JOIN card c ON t.card_id = c.card_id \
             AND t.row_id = c.row_id",
            "SELECT t.row_id, c.avg FROM input t \
             LEFT JOIN (SELECT * FROM card WHERE avg > 1) c ON t.row_id = c.row_id",
        ] {
            let join = SqlJoin::plan(sql, input_schema(), &[("card".into(), lookup_schema())])
                .await
                .unwrap();
            assert!(
                !join.has_row_aligned_joins(),
                "{sql}: {}",
                plan_text(&join, false)
            );
        }
    }

    #[tokio::test]
    async fn tables_not_aligned_take_the_hash_join_plan() {
        let join = planned(THREE_LEFT_JOINS).await;
        let rows: Vec<_> = (0..3)
            .map(|i| {
                (
                    format!("c{i}"),
                    Some(i as f64),
                    [Some(1.0), Some(2.0), Some(3.0)],
                )
            })
            .collect();
        // Same ids in another order in every table: still a valid input for the SQL.
        let shuffled = tables(&rows, &[2, 0, 1]);
        assert!(!tables_are_row_aligned(&shuffled, 3));
        let out = join.run(&shuffled).await.unwrap();
        let reference = join.run_with_hash_joins(&shuffled).await.unwrap();
        assert_eq!(out, reference);
        assert!(tables_are_row_aligned(&tables(&rows, &[0, 1, 2]), 3));
    }

    #[tokio::test]
    async fn misaligned_keys_are_an_error_not_a_wrong_pairing() {
        let join = planned(THREE_LEFT_JOINS).await;
        let rows: Vec<_> = (0..2)
            .map(|i| (format!("c{i}"), Some(1.0), [Some(1.0), None, None]))
            .collect();
        let mut bad = tables(&rows, &[0, 1]);
        bad[2] = tables(&rows, &[1, 0]).remove(2);
        // Bypass `run`'s precondition check to reach the operator's own.
        let err = join
            .execute(join.aligned_plan.as_ref().unwrap(), &bad, 2)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("row-aligned join"), "{err}");
    }

    fn row() -> impl Strategy<Value = Row> {
        let value = || proptest::option::of(-1e3..1e3f64);
        ("[a-c]{1,2}", value(), [value(), value(), value()])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The rewritten plan gives exactly the hash joins' output, batch after batch.
        #[test]
        fn row_aligned_joins_equal_hash_joins(
            batches in proptest::collection::vec(proptest::collection::vec(row(), 0..40), 1..4)
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            runtime.block_on(async {
                for sql in [THREE_LEFT_JOINS, MIXED_JOINS] {
                    let join = planned(sql).await;
                    for rows in &batches {
                        let ids: Vec<u32> = (0..rows.len() as u32).collect();
                        let tables = tables(rows, &ids);
                        let aligned = join.run(&tables).await.unwrap();
                        let hashed = join.run_with_hash_joins(&tables).await.unwrap();
                        prop_assert_eq!(
                            pretty_format_batches(std::slice::from_ref(&aligned)).unwrap().to_string(),
                            pretty_format_batches(std::slice::from_ref(&hashed)).unwrap().to_string()
                        );
                        prop_assert_eq!(aligned.schema(), hashed.schema());
                    }
                }
                Ok(())
            })?;
        }
    }
}
