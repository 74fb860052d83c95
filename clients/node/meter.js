#!/usr/bin/env node
// Meters usage through the metering gateway from Node.js, then shows what a
// refused request looks like. Prints one JSON line per call.
//
//   npm ci && node meter.js 127.0.0.1:50051
//
// The proto is loaded as-is from the repository (or METERING_PROTO_DIR).
// Quantities go out as decimal strings (usage_quantity_as_decimal): AWS
// deprecated the whole-number fields on 2026-10-20.
"use strict";

const path = require("node:path");
const crypto = require("node:crypto");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const { statusDetails } = require("./status");

const PROTO_DIR = process.env.METERING_PROTO_DIR || path.join(__dirname, "..", "..", "protos");

// gRPC's own retries (gRFC A6), as the Python client has them: UNAVAILABLE and
// RESOURCE_EXHAUSTED, with backoff, inside the call's deadline. Safe because the
// ClientToken makes a retried request the same request. @grpc/grpc-js honours the
// gateway's `grpc-retry-pushback-ms` trailer: negative (the gateway already
// retried AWS) stops the retries, a positive value is the delay before the next.
const RETRY_POLICY = {
  maxAttempts: 4,
  initialBackoff: "0.2s",
  maxBackoff: "5s",
  backoffMultiplier: 2,
  retryableStatusCodes: ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
};

function serviceConfig(retryPolicy) {
  const name = [{ service: "marketplace.metering.v1.MeteringService" }, { service: "marketplace.metering.v1.UsageRecorderService" }];
  return JSON.stringify({ methodConfig: [{ name, retryPolicy }] });
}

function meteringClient(target, retryPolicy = RETRY_POLICY) {
  const definition = protoLoader.loadSync("marketplace/metering/v1/metering.proto", {
    includeDirs: [PROTO_DIR], // google/protobuf/timestamp.proto comes with proto-loader
    keepCase: true, // field names exactly as in the proto: product_code, usage_quantity_as_decimal, ...
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const v1 = grpc.loadPackageDefinition(definition).marketplace.metering.v1;
  const options = { "grpc.enable_retries": 1, "grpc.service_config": serviceConfig(retryPolicy) };
  return new v1.MeteringService(target, grpc.credentials.createInsecure(), options);
}

function timestampOf(date) {
  const millis = date.getTime();
  return { seconds: String(Math.floor(millis / 1000)), nanos: (millis % 1000) * 1e6 };
}

function meterUsage(client, request) {
  return new Promise((resolve, reject) => {
    client.meterUsage(request, { deadline: Date.now() + 10000 }, (error, reply) => (error ? reject(error) : resolve(reply)));
  });
}

async function main() {
  const target = process.argv[2] || "127.0.0.1:50051";
  const client = meteringClient(target);
  const now = timestampOf(new Date());

  // 1. A valid request. A ClientToken makes retries of this request safe.
  const ok = await meterUsage(client, {
    product_code: process.env.PRODUCT_CODE || "prod-abc123",
    usage_dimension: "requests",
    timestamp: now,
    usage_quantity_as_decimal: "3.5",
    usage_allocations: [
      { allocated_usage_quantity_as_decimal: "2.25", tags: [{ key: "team", value: "search" }] },
      { allocated_usage_quantity_as_decimal: "1.25", tags: [] },
    ],
    client_token: crypto.randomUUID(),
  });
  console.log(JSON.stringify({ call: "valid", ok: true, metering_record_id: ok.metering_record_id, dry_run: ok.dry_run }));

  // 2. A request the gateway refuses: INVALID_ARGUMENT, every bad field named.
  try {
    await meterUsage(client, {
      product_code: "not a product code!",
      usage_dimension: "requests",
      timestamp: now,
      usage_quantity_as_decimal: "5",
      usage_allocations: [{ allocated_usage_quantity_as_decimal: "4", tags: [{ key: "", value: "x" }] }],
    });
    console.log(JSON.stringify({ call: "invalid", ok: true }));
  } catch (error) {
    const details = statusDetails(error);
    console.log(JSON.stringify({ call: "invalid", ok: false, ...details, code: grpc.status[error.code] }));
  }
  client.close();
}

module.exports = { RETRY_POLICY, meteringClient, meterUsage, timestampOf };

if (require.main === module) {
  main().catch((error) => {
    console.error(JSON.stringify({ error: error.message, code: error.code, details: error.details }));
    process.exit(1);
  });
}
