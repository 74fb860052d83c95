#!/usr/bin/env node
// One MeterUsage through meter.js's client (its retry policy, with short
// backoffs), for tests/test_node_client.py: it counts the AWS calls behind one
// caller request. Prints one JSON line: the outcome and the pushback trailer.
//
//   node count.js 127.0.0.1:50051
"use strict";

const crypto = require("node:crypto");
const grpc = require("@grpc/grpc-js");
const { RETRY_POLICY, meteringClient, meterUsage, timestampOf } = require("./meter");
const { statusDetails } = require("./status");

async function main() {
  const client = meteringClient(process.argv[2] || "127.0.0.1:50051", { ...RETRY_POLICY, initialBackoff: "0.01s" });
  const request = {
    product_code: "prod-abc123",
    usage_dimension: "requests",
    timestamp: timestampOf(new Date()),
    usage_quantity_as_decimal: "1",
    client_token: crypto.randomUUID(),
  };
  try {
    const reply = await meterUsage(client, request);
    console.log(JSON.stringify({ ok: true, metering_record_id: reply.metering_record_id }));
  } catch (error) {
    const details = statusDetails(error) || {};
    const [pushback] = error.metadata ? error.metadata.get("grpc-retry-pushback-ms") : [];
    console.log(JSON.stringify({ ok: false, code: grpc.status[error.code], reason: details.reason, pushback: pushback ?? null }));
  } finally {
    client.close();
  }
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
