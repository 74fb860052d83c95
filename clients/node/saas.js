#!/usr/bin/env node
// Meters SaaS usage through the metering gateway from Node.js: BatchMeterUsage for
// one customer's records, each record's status printed, records AWS left
// unprocessed sent again as they are; then what a refused record looks like.
// Prints one JSON line per call.
//
//   npm ci
//   CUSTOMER_AWS_ACCOUNT_ID=111122223333 LICENSE_ARN=arn:aws:license-manager::...:license:l-... \
//     node saas.js 127.0.0.1:50051
//   REGISTRATION_TOKEN=... node saas.js 127.0.0.1:50051   # ResolveCustomer first
//
// The customer is named one way: its AWS account id with its license ARN (what
// ResolveCustomer returns; the request's product_code stays empty, the license
// names the product), or, legacy, CUSTOMER_IDENTIFIER with PRODUCT_CODE.
"use strict";

const grpc = require("@grpc/grpc-js");
const { meteringClient, timestampOf } = require("./meter");
const { statusDetails } = require("./status");

const DEADLINE_MS = 10000;
const ROUNDS = 3; // calls for the same records at most: the gateway already resends within each

function call(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + DEADLINE_MS }, (error, reply) => (error ? reject(error) : resolve(reply)));
  });
}

// Who the records are for: the environment's customer, or the one a registration token names.
async function customer(client) {
  const token = process.env.REGISTRATION_TOKEN;
  if (!token) {
    return {
      customer_aws_account_id: process.env.CUSTOMER_AWS_ACCOUNT_ID || "",
      license_arn: process.env.LICENSE_ARN || "",
      customer_identifier: process.env.CUSTOMER_IDENTIFIER || "",
      product_code: process.env.PRODUCT_CODE || "",
    };
  }
  const found = await call(client, "resolveCustomer", { registration_token: token });
  console.log(JSON.stringify({ call: "resolve", ok: true, ...found }));
  return found; // keep customer_aws_account_id and license_arn: every record needs them
}

// The customer's fields of a record, and the request's product_code: one way, never both.
function naming(who) {
  if (who.license_arn) {
    return { fields: { customer_aws_account_id: who.customer_aws_account_id, license_arn: who.license_arn }, product_code: "" };
  }
  return { fields: { customer_identifier: who.customer_identifier }, product_code: who.product_code };
}

function shown(result) {
  const r = result.usage_record;
  return { dimension: r.dimension, quantity: r.quantity_as_decimal, status: result.status, metering_record_id: result.metering_record_id };
}

async function main() {
  const target = process.argv[2] || "127.0.0.1:50051";
  const client = meteringClient(target);
  const { fields, product_code } = naming(await customer(client));
  const now = timestampOf(new Date());

  // 1. Two records of this hour. Each is stamped once: a resend must be the identical record.
  let records = [
    {
      ...fields,
      dimension: "requests",
      timestamp: now,
      quantity_as_decimal: "12.5",
      usage_allocations: [
        { allocated_usage_quantity_as_decimal: "10", tags: [{ key: "team", value: "search" }] },
        { allocated_usage_quantity_as_decimal: "2.5", tags: [] },
      ],
    },
    { ...fields, dimension: "storage-gb", timestamp: now, quantity_as_decimal: "3" },
  ];
  for (let round = 1; records.length > 0 && round <= ROUNDS; round++) {
    const reply = await call(client, "batchMeterUsage", { usage_records: records, product_code });
    // STATUS_SUCCESS (kept, or kept before: the same id), STATUS_CUSTOMER_NOT_SUBSCRIBED,
    // STATUS_DUPLICATE_RECORD (the hour holds another quantity, which stays billed).
    console.log(JSON.stringify({ call: "batch", ok: true, round, results: reply.results.map(shown), unprocessed: reply.unprocessed_records.length }));
    records = reply.unprocessed_records; // as the gateway echoed them: send them exactly so
    if (records.length > 0) await new Promise((done) => setTimeout(done, 200 * 2 ** round));
  }
  if (records.length > 0) {
    console.log(JSON.stringify({ call: "batch", ok: false, unprocessed: records.length, note: "send these again later, as they are" }));
  }

  // 2. A record AWS would not take: usage more than 24 hours old. OUT_OF_RANGE,
  // TIMESTAMP_OUT_OF_BOUNDS, the BadRequest naming usage_records[0].timestamp.
  try {
    const old = timestampOf(new Date(Date.now() - 25 * 3600 * 1000));
    await call(client, "batchMeterUsage", { usage_records: [{ ...fields, dimension: "requests", timestamp: old, quantity_as_decimal: "1" }], product_code });
    console.log(JSON.stringify({ call: "too-old", ok: true }));
  } catch (error) {
    console.log(JSON.stringify({ call: "too-old", ok: false, ...statusDetails(error), code: grpc.status[error.code] }));
  }
  client.close();
}

if (require.main === module) {
  main().catch((error) => {
    console.error(JSON.stringify({ error: error.message, code: error.code, details: statusDetails(error) || error.details }));
    process.exit(1);
  });
}
