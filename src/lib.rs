//! token-broker: mints, caches and hands out partner API bearer tokens per tenant.

pub mod api;
pub mod app;
pub mod audit;
pub mod auth;
pub mod broker;
pub mod cache;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod db;
pub mod egress;
pub mod issuers;
pub mod metrics;
pub mod pop;
pub mod proxy;
pub mod telemetry;
pub mod tenants;
pub mod time;
