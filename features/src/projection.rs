//! DataFusion's projection without its per-execution metrics.
//!
//! [`ProjectionExec::execute`] builds a metric per projected expression every time it is
//! executed, naming each by formatting the expression as SQL, and its stream measures every
//! output batch's memory by walking all of its buffers. For a query that runs once that is
//! noise; for the workload SQL, executed once per micro-batch of about a hundred rows, a
//! profile at 10,000 tx/s put it at about a fifth of the join stage's CPU (2.8% of the whole
//! process: `Projector::with_metrics` → `fmt_sql`, `BaselineMetrics::record_poll` →
//! `get_record_batch_memory_size`). Nobody reads those metrics here.
//!
//! [`drop_projection_metrics`] replaces every `ProjectionExec` of a plan by a
//! [`PlainProjectionExec`] that evaluates the same expressions with the same output schema,
//! through DataFusion's own [`Projector`] built once at planning time.

use std::fmt;
use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::error::DataFusionError;
use datafusion::execution::TaskContext;
use datafusion::physical_expr::projection::Projector;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::execution_plan::apply_expression_roots;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties, ReplaceChildrenOptions,
    SendableRecordBatchStream,
};
use futures::StreamExt;

/// Replaces every `ProjectionExec` of `plan` by a [`PlainProjectionExec`]. A projection
/// whose metric-free equivalent would not have exactly the same output schema is kept.
pub(crate) fn drop_projection_metrics(
    plan: Arc<dyn ExecutionPlan>,
) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
    Ok(plan
        .transform_up(|node| {
            let Some(projection) = node.downcast_ref::<ProjectionExec>() else {
                return Ok(Transformed::no(node));
            };
            Ok(
                match PlainProjectionExec::try_from_projection(projection)? {
                    Some(plain) => Transformed::yes(Arc::new(plain) as Arc<dyn ExecutionPlan>),
                    None => Transformed::no(node),
                },
            )
        })?
        .data)
}

/// Evaluates a projection's expressions over each input batch; no metrics.
#[derive(Debug)]
pub(crate) struct PlainProjectionExec {
    input: Arc<dyn ExecutionPlan>,
    projector: Projector,
    /// The replaced `ProjectionExec`'s properties: same expressions, same input, same output.
    properties: Arc<PlanProperties>,
}

impl PlainProjectionExec {
    fn try_from_projection(projection: &ProjectionExec) -> datafusion::error::Result<Option<Self>> {
        let input = Arc::clone(projection.input());
        let output_schema = projection.schema();
        let projector = projection
            .projection_expr()
            .make_projector_with_schema_metadata(&input.schema(), &output_schema)?;
        // The operators above were planned against this schema, metadata included.
        if projector.output_schema() != &output_schema {
            return Ok(None);
        }
        Ok(Some(Self {
            input,
            projector,
            properties: Arc::clone(projection.properties()),
        }))
    }
}

impl DisplayAs for PlainProjectionExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let exprs: Vec<String> = self
            .projector
            .projection()
            .iter()
            .map(|p| format!("{} as {}", p.expr, p.alias))
            .collect();
        write!(f, "PlainProjectionExec: expr=[{}]", exprs.join(", "))
    }
}

impl ExecutionPlan for PlainProjectionExec {
    fn name(&self) -> &str {
        "PlainProjectionExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> datafusion::error::Result<TreeNodeRecursion>,
    ) -> datafusion::error::Result<TreeNodeRecursion> {
        apply_expression_roots(self.projector.projection().iter().map(|p| &p.expr), f)
    }

    fn replace_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let [input]: [Arc<dyn ExecutionPlan>; 1] = children.try_into().map_err(|c: Vec<_>| {
            DataFusionError::Internal(format!(
                "PlainProjectionExec has one child, got {}",
                c.len()
            ))
        })?;
        // Rebinding the input per batch keeps its schema, so the projector and the
        // properties computed from it stay valid (the same contract `reset_state` relies on).
        if input.schema() != self.input.schema() {
            return Err(DataFusionError::Internal(
                "PlainProjectionExec: the new input's schema differs from the planned one".into(),
            ));
        }
        Ok(Arc::new(Self {
            input,
            projector: self.projector.clone(),
            properties: Arc::clone(&self.properties),
        }))
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(datafusion::physical_plan::ChildrenPropertiesMode::Keep),
        )
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> datafusion::error::Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        let projector = self.projector.clone();
        let projected = input.map(move |batch| projector.project_batch(&batch?));
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema(),
            projected,
        )))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Float64Array, StringArray, UInt32Array};
    use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
    use arrow::record_batch::RecordBatch;
    use datafusion::physical_plan::displayable;

    use crate::SqlJoin;

    fn schema(fields: &[(&str, DataType)]) -> SchemaRef {
        Arc::new(Schema::new(
            fields
                .iter()
                .map(|(name, t)| Field::new(*name, t.clone(), true))
                .collect::<Vec<_>>(),
        ))
    }

    fn input_schema() -> SchemaRef {
        schema(&[
            ("row_id", DataType::UInt32),
            ("card_id", DataType::Utf8),
            ("amount", DataType::Float64),
        ])
    }

    fn card_schema() -> SchemaRef {
        schema(&[
            ("row_id", DataType::UInt32),
            ("card_id", DataType::Utf8),
            ("avg", DataType::Float64),
        ])
    }

    const SQL: &str = "SELECT t.row_id, \
         CASE WHEN c.avg IS NULL THEN NULL ELSE t.amount / c.avg END AS ratio, \
         CAST(t.amount AS INT) AS whole, c.card_id IS NULL AS unknown \
         FROM input t LEFT JOIN card c ON t.row_id = c.row_id";

    fn tables(avgs: &[Option<f64>]) -> Vec<RecordBatch> {
        let n = avgs.len() as u32;
        let cards: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
        let input = RecordBatch::try_new(
            input_schema(),
            vec![
                Arc::new(UInt32Array::from_iter_values(0..n)),
                Arc::new(StringArray::from_iter_values(&cards)),
                Arc::new(Float64Array::from_iter_values(
                    (0..n).map(|i| 10.0 + i as f64),
                )),
            ],
        )
        .unwrap();
        let card = RecordBatch::try_new(
            card_schema(),
            vec![
                Arc::new(UInt32Array::from_iter_values(0..n)),
                Arc::new(StringArray::from_iter(
                    avgs.iter().zip(&cards).map(|(a, c)| a.map(|_| c.as_str())),
                )),
                Arc::new(Float64Array::from(avgs.to_vec())),
            ],
        )
        .unwrap();
        vec![input, card]
    }

    #[tokio::test]
    async fn the_aligned_plan_projects_without_metrics_and_equals_datafusions_projection() {
        let join = SqlJoin::plan(SQL, input_schema(), &[("card".into(), card_schema())])
            .await
            .unwrap();
        let aligned = displayable(join.aligned_plan.as_ref().unwrap().as_ref())
            .indent(false)
            .to_string();
        let operators = |plan: &str, name: &str| {
            plan.lines()
                .filter(|line| line.trim_start().starts_with(name))
                .count()
        };
        assert_eq!(operators(&aligned, "PlainProjectionExec:"), 1, "{aligned}");
        assert_eq!(operators(&aligned, "ProjectionExec:"), 0, "{aligned}");
        // The hash-join plan keeps DataFusion's own projection: the reference.
        let hashed = displayable(join.plan.as_ref()).indent(false).to_string();
        assert_eq!(operators(&hashed, "ProjectionExec:"), 1, "{hashed}");

        // Executed twice, so a projection that kept state between batches would show.
        for avgs in [
            vec![Some(2.0), None, Some(4.0)],
            vec![None, Some(5.0), Some(0.5), Some(1.0)],
        ] {
            let tables = tables(&avgs);
            let out = join.run(&tables).await.unwrap();
            let reference = join.run_with_hash_joins(&tables).await.unwrap();
            assert_eq!(out, reference);
            assert_eq!(out.num_rows(), avgs.len());
        }
    }
}
