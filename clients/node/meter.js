#!/usr/bin/env node
// Meters usage through the metering gateway from Node.js, then shows what a
// refused request looks like. Prints one JSON line per call.
//
//   npm ci && node meter.js 127.0.0.1:50051
//
// The proto is loaded as-is from the repository (or METERING_PROTO_DIR).
"use strict";

const path = require("node:path");
const crypto = require("node:crypto");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const { statusDetails } = require("./status");

const PROTO_DIR = process.env.METERING_PROTO_DIR || path.join(__dirname, "..", "..", "protos");

function meteringClient(target) {
  const definition = protoLoader.loadSync("marketplace/metering/v1/metering.proto", {
    includeDirs: [PROTO_DIR], // google/protobuf/timestamp.proto comes with proto-loader
    keepCase: true, // field names exactly as in the proto: product_code, usage_quantity, ...
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const v1 = grpc.loadPackageDefinition(definition).marketplace.metering.v1;
  return new v1.MeteringService(target, grpc.credentials.createInsecure());
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
    usage_quantity: "3",
    usage_allocations: [
      { allocated_usage_quantity: "2", tags: [{ key: "team", value: "search" }] },
      { allocated_usage_quantity: "1", tags: [] },
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
      usage_quantity: "5",
      usage_allocations: [{ allocated_usage_quantity: "4", tags: [{ key: "", value: "x" }] }],
    });
    console.log(JSON.stringify({ call: "invalid", ok: true }));
  } catch (error) {
    const details = statusDetails(error);
    console.log(JSON.stringify({ call: "invalid", ok: false, ...details, code: grpc.status[error.code] }));
  }
  client.close();
}

main().catch((error) => {
  console.error(JSON.stringify({ error: error.message, code: error.code, details: error.details }));
  process.exit(1);
});
