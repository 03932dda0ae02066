//! `akosha-aggregator query …`: the query API from a terminal, human-readable by default, `--json` for scripts.

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::Value;

#[derive(Args)]
pub(crate) struct QueryArgs {
    /// Aggregator HTTP address (default: the configuration's http.listen).
    #[arg(long)]
    url: Option<String>,
    /// Bearer token.
    #[arg(long, env = "AKOSHA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print the API's JSON instead of a summary.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: QueryCommand,
}

#[derive(Args, Clone, Default)]
struct Scope {
    /// Only these systems (comma-separated).
    #[arg(long)]
    system: Option<String>,
    /// From: RFC 3339 time or microseconds since the epoch.
    #[arg(long)]
    since: Option<String>,
    /// Until: RFC 3339 time or microseconds since the epoch.
    #[arg(long)]
    until: Option<String>,
}

#[derive(Subcommand)]
enum QueryCommand {
    /// Search memories (hybrid by default).
    Search {
        /// What to look for.
        text: String,
        /// hybrid, vector or text.
        #[arg(long, default_value = "hybrid")]
        mode: String,
        #[arg(long, default_value_t = 10)]
        limit: usize,
        #[arg(long)]
        project: Option<String>,
        /// Record kinds (comma-separated).
        #[arg(long)]
        kind: Option<String>,
        /// Minimum cosine similarity (vector search).
        #[arg(long)]
        min_similarity: Option<f32>,
        #[command(flatten)]
        scope: Scope,
    },
    /// One record.
    Get { system: String, kind: String, id: String },
    /// Records newest first, a page at a time.
    List {
        #[arg(long, default_value = "conversation")]
        kind: String,
        #[arg(long)]
        project: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Continue after a previous page.
        #[arg(long)]
        cursor: Option<String>,
        #[command(flatten)]
        scope: Scope,
    },
    /// Record counts per system and kind (with --projects, per project).
    Stats {
        #[arg(long)]
        projects: bool,
    },
    /// Entities near an entity (id or name).
    Neighbours {
        entity: String,
        #[arg(long, default_value_t = 1)]
        depth: u32,
        #[arg(long)]
        relation_type: Option<String>,
        #[command(flatten)]
        scope: Scope,
    },
    /// Shortest path between two entities.
    Path {
        from: String,
        to: String,
        #[arg(long, default_value_t = 3)]
        max_hops: u32,
    },
    /// Knowledge-graph statistics.
    GraphStats,
    /// Metric names per system.
    Metrics {
        #[command(flatten)]
        scope: Scope,
    },
    /// A metric's series (resolution raw, 1m, 5m, 1h or auto).
    Series {
        metric: String,
        #[arg(long, default_value = "auto")]
        resolution: String,
        #[command(flatten)]
        scope: Scope,
    },
    /// A metric's trend per system.
    Trend {
        metric: String,
        #[command(flatten)]
        scope: Scope,
    },
    /// A metric's anomalous points.
    Anomalies {
        metric: String,
        #[arg(long, default_value_t = 3.0)]
        threshold: f64,
        /// Median/MAD instead of mean/stddev.
        #[arg(long)]
        robust: bool,
        #[command(flatten)]
        scope: Scope,
    },
    /// Correlation of a metric between systems.
    Correlation {
        metric: String,
        #[command(flatten)]
        scope: Scope,
    },
}

fn scope_params(scope: &Scope, params: &mut Vec<(&'static str, String)>) {
    for (key, value) in [("system_id", &scope.system), ("since", &scope.since), ("until", &scope.until)] {
        if let Some(v) = value {
            params.push((key, v.clone()));
        }
    }
}

/// Runs one query against the aggregator at `default_url` unless `--url` says otherwise.
pub(crate) fn run(args: QueryArgs, default_url: String) -> anyhow::Result<()> {
    let base = args.url.clone().unwrap_or(default_url);
    let base = base.trim_end_matches('/').to_owned();
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the runtime")?;
    let client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(60)).build()?;
    let mut params: Vec<(&'static str, String)> = Vec::new();
    let (method_post, path, body): (bool, String, Option<Value>) = match &args.command {
        QueryCommand::Search { text, mode, limit, project, kind, min_similarity, scope } => {
            if !["hybrid", "vector", "text"].contains(&mode.as_str()) {
                bail!("--mode must be hybrid, vector or text, not `{mode}`");
            }
            let mut body = serde_json::json!({"query": text, "limit": limit});
            if let Some(s) = &scope.system {
                body["system_ids"] = s.split(',').map(str::trim).collect::<Vec<_>>().into();
            }
            for (key, value) in [("project", project), ("since", &scope.since), ("until", &scope.until)] {
                if let Some(v) = value {
                    body[key] = match v.parse::<i64>() {
                        Ok(us) if key != "project" => us.into(),
                        _ => v.clone().into(),
                    };
                }
            }
            if let Some(k) = kind {
                body["kinds"] = k.split(',').map(str::trim).collect::<Vec<_>>().into();
            }
            if let Some(m) = min_similarity {
                body["min_similarity"] = (*m).into();
            }
            (true, format!("/v1/search/{mode}"), Some(body))
        }
        QueryCommand::Get { system, kind, id } => (false, format!("/v1/records/{system}/{kind}/{id}"), None),
        QueryCommand::List { kind, project, limit, cursor, scope } => {
            params.push(("kind", kind.clone()));
            params.push(("limit", limit.to_string()));
            if let Some(p) = project {
                params.push(("project", p.clone()));
            }
            if let Some(c) = cursor {
                params.push(("cursor", c.clone()));
            }
            scope_params(scope, &mut params);
            (false, "/v1/records".into(), None)
        }
        QueryCommand::Stats { projects } => {
            (false, if *projects { "/v1/stats/projects".into() } else { "/v1/stats".into() }, None)
        }
        QueryCommand::Neighbours { entity, depth, relation_type, scope } => {
            params.push(("entity", entity.clone()));
            params.push(("depth", depth.to_string()));
            if let Some(t) = relation_type {
                params.push(("relation_type", t.clone()));
            }
            scope_params(scope, &mut params);
            (false, "/v1/graph/neighbours".into(), None)
        }
        QueryCommand::Path { from, to, max_hops } => {
            params.extend([("from", from.clone()), ("to", to.clone()), ("max_hops", max_hops.to_string())]);
            (false, "/v1/graph/path".into(), None)
        }
        QueryCommand::GraphStats => (false, "/v1/graph/stats".into(), None),
        QueryCommand::Metrics { scope } => {
            scope_params(scope, &mut params);
            (false, "/v1/metrics".into(), None)
        }
        QueryCommand::Series { metric, resolution, scope } => {
            params.extend([("metric", metric.clone()), ("resolution", resolution.clone())]);
            scope_params(scope, &mut params);
            (false, "/v1/metrics/series".into(), None)
        }
        QueryCommand::Trend { metric, scope } => {
            params.push(("metric", metric.clone()));
            scope_params(scope, &mut params);
            (false, "/v1/metrics/trend".into(), None)
        }
        QueryCommand::Anomalies { metric, threshold, robust, scope } => {
            params.extend([
                ("metric", metric.clone()),
                ("threshold", threshold.to_string()),
                ("robust", robust.to_string()),
            ]);
            scope_params(scope, &mut params);
            (false, "/v1/metrics/anomalies".into(), None)
        }
        QueryCommand::Correlation { metric, scope } => {
            params.push(("metric", metric.clone()));
            scope_params(scope, &mut params);
            (false, "/v1/metrics/correlation".into(), None)
        }
    };
    let url = format!("{base}{path}");
    let value = call(&runtime, &client, &base, args.token.as_deref(), method_post, &url, &params, body.as_ref())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    print!("{}", render(&args.command, &value));
    Ok(())
}

/// One API call; an error answer becomes an error naming its status, code and message.
#[allow(clippy::too_many_arguments)]
pub(crate) fn call(
    runtime: &tokio::runtime::Runtime,
    client: &reqwest::Client,
    base: &str,
    token: Option<&str>,
    post: bool,
    url: &str,
    params: &[(&'static str, String)],
    body: Option<&Value>,
) -> anyhow::Result<Value> {
    let mut request = if post { client.post(url) } else { client.get(url) }.query(params);
    if let Some(body) = body {
        request = request.json(body);
    }
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let (status, value): (reqwest::StatusCode, Value) = runtime.block_on(async {
        let response = request.send().await.with_context(|| format!("cannot reach the aggregator at {base}"))?;
        let status = response.status();
        let text = response.text().await.context("reading the answer")?;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        anyhow::Ok((status, value))
    })?;
    if !status.is_success() {
        let message = value.get("message").and_then(Value::as_str).map_or_else(|| value.to_string(), str::to_owned);
        let code = value.get("error").and_then(Value::as_str).unwrap_or("error");
        bail!("{} ({code}): {message}", status.as_u16());
    }
    Ok(value)
}

fn s(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

fn time(us: Option<i64>) -> String {
    us.and_then(|us| jiff::Timestamp::from_microsecond(us).ok())
        .map_or_else(|| "-".into(), |t| t.strftime("%Y-%m-%d %H:%M:%S").to_string())
}

fn one_line(text: &str, width: usize) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= width { flat } else { format!("{}…", flat.chars().take(width).collect::<String>()) }
}

fn render(command: &QueryCommand, v: &Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let list = |key: &str| v.get(key).and_then(Value::as_array).cloned().unwrap_or_default();
    match command {
        QueryCommand::Search { .. } => {
            let results = list("results");
            let _ = writeln!(
                out,
                "{} result(s) in {:.1} ms",
                results.len(),
                v.get("took_ms").and_then(Value::as_f64).unwrap_or(0.0)
            );
            for (i, hit) in results.iter().enumerate() {
                let r = &hit["record"];
                let _ = writeln!(
                    out,
                    "{:>3}. {:.4}  {}/{}/{}  {}  [{}]",
                    i + 1,
                    hit["score"].as_f64().unwrap_or(0.0),
                    s(r, "system_id"),
                    s(r, "kind"),
                    s(r, "id"),
                    time(r["ts"].as_i64()),
                    s(r, "project"),
                );
                let text = hit["snippet"]["text"].as_str().or(r["text"].as_str()).or(r["name"].as_str()).unwrap_or("");
                let _ = writeln!(out, "     {}", one_line(text, 110));
            }
        }
        QueryCommand::Get { .. } => {
            let _ = writeln!(out, "{}", serde_json::to_string_pretty(v).unwrap_or_default());
        }
        QueryCommand::List { .. } => {
            for r in list("records") {
                let body = r["text"].as_str().or(r["name"].as_str()).unwrap_or("");
                let _ = writeln!(
                    out,
                    "{}  {}/{}  [{}]  {}",
                    time(r["ts"].as_i64()),
                    s(&r, "system_id"),
                    s(&r, "id"),
                    s(&r, "project"),
                    one_line(body, 80)
                );
            }
            if let Some(c) = v["next_cursor"].as_str() {
                let _ = writeln!(out, "more: --cursor {c}");
            }
        }
        QueryCommand::Stats { projects: true } => {
            let _ = writeln!(out, "{:<24} {:<24} {:<12} {:>10}", "system", "project", "kind", "records");
            for p in list("projects") {
                let _ = writeln!(
                    out,
                    "{:<24} {:<24} {:<12} {:>10}",
                    s(&p, "system_id"),
                    s(&p, "project"),
                    s(&p, "kind"),
                    s(&p, "records")
                );
            }
        }
        QueryCommand::Stats { projects: false } => {
            let _ = writeln!(out, "total records: {}", s(v, "total_records"));
            if let Some(systems) = v["systems"].as_object() {
                for (system, kinds) in systems {
                    let _ = writeln!(out, "  {system}: {kinds}");
                }
            }
            let _ = writeln!(out, "index lag: {} records", v["hot"]["index_pending"]);
        }
        QueryCommand::Neighbours { .. } => {
            for n in list("nodes") {
                let _ = writeln!(
                    out,
                    "{}{}  {} ({})  {}",
                    "  ".repeat(n["depth"].as_u64().unwrap_or(0) as usize),
                    s(&n, "name"),
                    s(&n, "id"),
                    s(&n, "entity_type"),
                    s(&n, "system_id")
                );
            }
            let _ = writeln!(
                out,
                "{} relation(s){}",
                list("edges").len(),
                if v["truncated"] == true { ", truncated" } else { "" }
            );
        }
        QueryCommand::Path { .. } => {
            if v["found"] == true {
                let names: Vec<String> = v["path"]["nodes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|n| if n["name"].is_string() { s(n, "name") } else { s(n, "id") })
                    .collect();
                let _ = writeln!(out, "{} hop(s): {}", v["path"]["hops"], names.join(" → "));
            } else {
                let _ = writeln!(out, "no path");
            }
        }
        QueryCommand::GraphStats => {
            let _ = writeln!(
                out,
                "entities {}  relations {}  components {}  largest {}  average degree {:.2}",
                s(v, "entities"),
                s(v, "relations"),
                s(v, "components"),
                s(v, "largest_component"),
                v["average_degree"].as_f64().unwrap_or(0.0)
            );
        }
        QueryCommand::Metrics { .. } => {
            for m in list("metrics") {
                let _ = writeln!(
                    out,
                    "{:<24} {:<32} points {:>8}  latest {:>12}  mean {:>12.3}",
                    s(&m, "system_id"),
                    s(&m, "name"),
                    s(&m, "points"),
                    s(&m, "latest"),
                    m["mean"].as_f64().unwrap_or(0.0)
                );
            }
        }
        QueryCommand::Series { .. } => {
            for series in list("series") {
                let _ = writeln!(out, "{}:", s(&series, "system_id"));
                for p in series["points"].as_array().into_iter().flatten() {
                    let _ = writeln!(
                        out,
                        "  {}  {:>12.3}  (n={})",
                        time(p["ts"].as_i64()),
                        p["value"].as_f64().unwrap_or(0.0),
                        p["count"]
                    );
                }
            }
        }
        QueryCommand::Trend { .. } => {
            for t in list("trends") {
                let _ = writeln!(
                    out,
                    "{:<24} {:<10} {:+.2} %  slope {:+.4}/h  r² {:.3}",
                    s(&t, "system_id"),
                    s(&t, "direction"),
                    t["change_percent"].as_f64().unwrap_or(0.0),
                    t["slope_per_hour"].as_f64().unwrap_or(0.0),
                    t["r_squared"].as_f64().unwrap_or(0.0)
                );
            }
        }
        QueryCommand::Anomalies { .. } => {
            for a in list("anomalies") {
                let _ = writeln!(
                    out,
                    "{}  {:<24} value {:>12.3}  score {:+.2}",
                    time(a["ts"].as_i64()),
                    s(&a, "system_id"),
                    a["value"].as_f64().unwrap_or(0.0),
                    a["score"].as_f64().unwrap_or(0.0)
                );
            }
        }
        QueryCommand::Correlation { .. } => {
            for c in list("correlations") {
                let _ = writeln!(
                    out,
                    "{} ~ {}  r {:+.3}  ({}, {} points)",
                    s(&c, "system_a"),
                    s(&c, "system_b"),
                    c["r"].as_f64().unwrap_or(0.0),
                    s(&c, "strength"),
                    c["points"]
                );
            }
        }
    }
    if out.is_empty() {
        out.push_str("(nothing)\n");
    }
    out
}

/// `akosha-aggregator lifecycle …`.
#[derive(Args)]
pub(crate) struct LifecycleArgs {
    /// Aggregator HTTP address (default: the configuration's http.listen).
    #[arg(long)]
    url: Option<String>,
    /// Bearer token (admin scope to run moves).
    #[arg(long, env = "AKOSHA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print the API's JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: LifecycleCommand,
}

#[derive(Subcommand)]
enum LifecycleCommand {
    /// Run the moves now (hot to warm, then warm to cold and compaction), or with --dry-run show what would move.
    Run {
        #[arg(long)]
        dry_run: bool,
    },
    /// Pending, running and failed moves and the journals.
    Status,
}

pub(crate) fn lifecycle(args: LifecycleArgs, default_url: String) -> anyhow::Result<()> {
    let base = args.url.clone().unwrap_or(default_url).trim_end_matches('/').to_owned();
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the runtime")?;
    // Moves of a large backlog take a while; the server does them in one request.
    let client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(3600)).build()?;
    let token = args.token.as_deref();
    let get = |path: &str| call(&runtime, &client, &base, token, false, &format!("{base}{path}"), &[], None);
    let post = |path: &str| call(&runtime, &client, &base, token, true, &format!("{base}{path}"), &[], None);
    let status = get("/v1/lifecycle")?;
    let due = |stage: &str| status[stage]["records_due"].as_u64();
    let window =
        |stage: &str| status[stage]["window_s"].as_u64().map_or_else(|| "-".into(), |s| format!("{}d", s / 86_400));
    match args.command {
        LifecycleCommand::Status => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&status)?);
                return Ok(());
            }
            for stage in ["hot_to_warm", "warm_to_cold"] {
                let v = &status[stage];
                if v.is_null() {
                    println!("{stage}: tier disabled");
                    continue;
                }
                println!(
                    "{stage}: window {}, {} records due, {} running, {} failed{}{}",
                    window(stage),
                    due(stage).unwrap_or(0),
                    v["running"],
                    v["failed"],
                    if v["circuit_open"] == true { ", object store circuit OPEN" } else { "" },
                    v["last_error"].as_str().map_or_else(String::new, |e| format!(", last error: {e}")),
                );
                for j in v["journal"].as_array().into_iter().flatten().take(10) {
                    println!(
                        "  {} {:<12} {:<14} {:>8} records  {}",
                        time(j["started_at"].as_i64()),
                        s(j, "kind"),
                        s(j, "state"),
                        s(j, "records"),
                        j.get("object").and_then(Value::as_str).unwrap_or_default()
                    );
                }
            }
        }
        LifecycleCommand::Run { dry_run: true } => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&status)?);
                return Ok(());
            }
            match due("hot_to_warm") {
                Some(n) => println!("would move {n} records older than {} from hot to warm", window("hot_to_warm")),
                None => println!("hot to warm: the warm tier is disabled"),
            }
            match due("warm_to_cold") {
                Some(n) => println!("would move {n} records older than {} from warm to cold", window("warm_to_cold")),
                None => println!("warm to cold: the cold tier is disabled"),
            }
            for (tiers, key) in [("from cold back to warm", "cold_to_warm"), ("from warm to hot", "warm_to_hot")] {
                let candidates = status[key]["candidates"].as_array().cloned().unwrap_or_default();
                println!("would promote {} groups read often {tiers}", candidates.len());
                for c in candidates.iter().take(20) {
                    println!(
                        "  {} {} {} ({:.1} reads){}",
                        s(c, "kind"),
                        s(c, "system_id"),
                        s(c, "day"),
                        c["reads"].as_f64().unwrap_or(0.0),
                        if c["too_young"] == true { ", waits for min_age" } else { "" }
                    );
                }
            }
        }
        LifecycleCommand::Run { dry_run: false } => {
            let mut out = serde_json::json!({});
            if !status["hot_to_warm"].is_null() {
                out["hot_to_warm"] = post("/v1/admin/warm/move")?;
            }
            if !status["warm_to_cold"].is_null() {
                out["cold_to_warm"] = post("/v1/admin/cold/promote")?;
                out["warm_to_cold"] = post("/v1/admin/cold/move")?;
            }
            if args.json {
                println!("{}", serde_json::to_string_pretty(&out)?);
                return Ok(());
            }
            let moved = |v: &Value| -> u64 {
                v["report"]["records"].as_array().map_or_else(
                    || v["report"]["records"].as_u64().unwrap_or(0),
                    |per_kind| per_kind.iter().filter_map(|p| p[1].as_u64()).sum(),
                )
            };
            println!("hot to warm: {} records moved", moved(&out["hot_to_warm"]));
            if !out["cold_to_warm"].is_null() {
                let p = &out["cold_to_warm"]["report"];
                println!(
                    "cold to warm: {} groups read often promoted ({} records); {} too young to move again, {} deferred",
                    p["groups"], p["records"], p["too_young"], p["deferred"]
                );
                let h = &out["cold_to_warm"]["hot"];
                println!(
                    "warm to hot: {} groups read often promoted ({} records), {} idle ones released; {} too young, {} deferred",
                    h["promoted"], h["records"], h["released"], h["too_young"], h["deferred"]
                );
            }
            println!(
                "warm to cold: {} records moved in {} objects; compaction merged {} objects, deleted {} orphans",
                moved(&out["warm_to_cold"]),
                out["warm_to_cold"]["report"]["objects"].as_u64().unwrap_or(0),
                out["warm_to_cold"]["compaction"]["objects_replaced"].as_u64().unwrap_or(0),
                out["warm_to_cold"]["compaction"]["orphans_deleted"].as_u64().unwrap_or(0),
            );
        }
    }
    Ok(())
}

/// `keys status` and `keys rewrap`: which key-encryption keys wrap the cold objects' data keys.
pub(crate) fn keys(base: String, token: Option<String>, rewrap: bool) -> anyhow::Result<()> {
    let base = base.trim_end_matches('/').to_owned();
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the runtime")?;
    let client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(600)).build()?;
    let path = if rewrap { "/v1/admin/keys/rewrap" } else { "/v1/admin/keys" };
    let answer = call(&runtime, &client, &base, token.as_deref(), rewrap, &format!("{base}{path}"), &[], None)?;
    if answer["enabled"] != true {
        println!("encryption at rest is off (no `encryption.keys`); cold objects and backups are stored in the clear");
    } else {
        let keys: Vec<&str> = answer["keys"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        println!("active key: {}; configured: {}", s(&answer, "active_key"), keys.join(", "));
    }
    if rewrap {
        println!("re-wrapped {} data keys", answer["rewrapped"]);
    }
    for (key, n) in answer["cold_objects"].as_object().into_iter().flatten() {
        println!("  {key:<24} {n:>10} cold objects");
    }
    Ok(())
}
