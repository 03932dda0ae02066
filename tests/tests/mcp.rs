//! MCP against a running aggregator: the reference MCP client (Python SDK) runs a real session —
//! `initialize` → `tools/list` → `tools/call` — with bearer tokens: a writer stores memories, graph records
//! and metric points through Akosha's tool names, a reader searches, walks the graph and analyses the metrics,
//! and a reader that tries to store is refused. Without a token, the HTTP layer answers 401.

use std::io::Write;
use std::process::{Command, Stdio};

use akosha_e2e::{Aggregator, Site};
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

const WRITER: &str = "writer-token-0123456789";
const READER: &str = "reader-token-0123456789";

fn session(url: &str, token: &str, calls: &Value) -> Result<Value> {
    let script = akosha_e2e::crate_path("clients/mcp_session.py");
    let mut child = Command::new("python3")
        .arg(script)
        .args([url, token])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("python3")?;
    child.stdin.take().context("stdin")?.write_all(calls.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("MCP client failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn mcp_sdk_present() -> bool {
    let present =
        Command::new("python3").args(["-c", "import mcp.client.streamable_http"]).status().is_ok_and(|s| s.success());
    assert!(present || std::env::var_os("CI").is_none(), "the MCP Python SDK is missing (run scripts/setup.sh)");
    present
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_mcp_client_session_with_scoped_tokens() -> Result<()> {
    if !mcp_sdk_present() {
        eprintln!("skipping: no MCP Python SDK");
        return Ok(());
    }
    let site = Site::new()?;
    let auth = format!(
        "auth: {{tokens: [{{name: writer, token: {WRITER}, scopes: [read, write]}}, {{name: reader, token: {READER}, scopes: [read]}}]}}\n\
         embeddings: {{enabled: false}}\n"
    );
    let agg = Aggregator::start_configured(&site, "agg", "", &auth).await?;
    let url = format!("{}/mcp", agg.url);

    // No token: refused before any tool runs.
    let response = reqwest::Client::new()
        .post(&url)
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}))
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 401);
    assert_eq!(response.json::<Value>().await?["error"], "unauthorized");

    let unit = |hot: usize| -> Vec<f32> { (0..384).map(|d| if d == hot { 1.0 } else { 0.0 }).collect() };
    let memories: Vec<Value> = (0..12)
        .map(|i| {
            json!({
                "memory_id": format!("mem-{i}"),
                "text": format!("memory {i} about {}", if i % 2 == 0 { "certificate rotation" } else { "parquet compaction" }),
                "embedding": unit(i % 2),
                "metadata": {"source": "laptop-7", "project": "akosha", "type": "conversation"},
            })
        })
        .collect();
    let writes = json!([
        ["batch_store_memories", {"memories": memories}],
        ["create_entity", {"name": "akosha", "entity_type": "project", "observations": [], "properties": {"original_id": "e-akosha"}, "metadata": {"source": "laptop-7"}}],
        ["create_entity", {"name": "duckdb", "entity_type": "library", "observations": [], "properties": {"original_id": "e-duckdb"}, "metadata": {"source": "laptop-7"}}],
        ["create_entity", {"name": "arrow", "entity_type": "library", "observations": [], "properties": {"original_id": "e-arrow"}, "metadata": {"source": "laptop-7"}}],
        ["create_relation", {"from_entity": "e-akosha", "to_entity": "e-duckdb", "relation_type": "uses", "properties": {"original_id": "r-1"}, "metadata": {"source": "laptop-7"}}],
        ["create_relation", {"from_entity": "e-duckdb", "to_entity": "e-arrow", "relation_type": "uses", "properties": {"original_id": "r-2"}, "metadata": {"source": "laptop-7"}}],
    ]);
    let out = tokio::task::spawn_blocking({
        let url = url.clone();
        move || session(&url, WRITER, &writes)
    })
    .await??;
    assert_eq!(out["server"], "akosha-aggregator");
    let tools: Vec<&str> = out["tools"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    for tool in [
        "search_all_systems",
        "store_memory",
        "batch_store_memories",
        "generate_embedding",
        "get_system_metrics",
        "analyze_trends",
        "detect_anomalies",
        "correlate_systems",
        "query_knowledge_graph",
        "find_path",
        "get_graph_statistics",
        "health_check",
        "search_text",
        "search_hybrid",
        "get_memory",
    ] {
        assert!(tools.contains(&tool), "tools/list lacks {tool}: {tools:?}");
    }
    for call in out["calls"].as_array().unwrap() {
        assert_eq!(call["isError"], false, "{call}");
    }
    let stored = &out["calls"][0];
    assert_eq!(stored["text"].as_array().map(Vec::len), Some(1));

    // Search needs the records in the index: wait until the text index has all twelve memories.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let stats: Value = reqwest::Client::new()
            .get(format!("{}/v1/stats", agg.url))
            .bearer_auth(READER)
            .send()
            .await?
            .json()
            .await?;
        if stats["hot"]["indexed"].as_u64() >= Some(15) && stats["hot"]["index_pending"] == 0 {
            break;
        }
        if std::time::Instant::now() > deadline {
            bail!("records never became searchable: {stats}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    let reads = json!([
        ["search_text", {"query": "certificate rotation", "limit": 20, "system_id": "laptop-7"}],
        ["search_text", {"query": "certificate rotation", "system_id": "another-system"}],
        ["get_memory", {"system_id": "laptop-7", "id": "mem-3"}],
        ["query_knowledge_graph", {"entity_id": "akosha", "depth": 2}],
        ["find_path", {"source_id": "akosha", "target_id": "arrow", "max_hops": 3}],
        ["get_graph_statistics", {}],
        ["store_memory", {"memory_id": "sneaky", "text": "a reader tries to write", "metadata": {"source": "laptop-7"}}],
        ["health_check", {}],
        ["search_all_systems", {"query": "certificates"}],
    ]);
    let out = tokio::task::spawn_blocking(move || session(&url, READER, &reads)).await??;
    let calls = out["calls"].as_array().unwrap();
    let found: Vec<&str> =
        calls[0]["structured"]["results"].as_array().unwrap().iter().filter_map(|r| r["id"].as_str()).collect();
    assert_eq!(found.len(), 6, "the six certificate memories: {found:?}");
    assert!(found.iter().all(|id| id.trim_start_matches("mem-").parse::<u32>().unwrap() % 2 == 0), "{found:?}");
    assert_eq!(calls[1]["structured"]["total_results"], 0, "system_id filter honoured");
    assert_eq!(calls[2]["structured"]["found"], true);
    assert_eq!(calls[2]["structured"]["record"]["text"], "memory 3 about parquet compaction");
    let neighbours: Vec<&str> =
        calls[3]["structured"]["neighbors"].as_array().unwrap().iter().filter_map(|n| n["name"].as_str()).collect();
    assert_eq!(neighbours, ["duckdb", "arrow"], "depth 2 reaches arrow through duckdb");
    assert_eq!(calls[4]["structured"]["found"], true);
    assert_eq!(calls[4]["structured"]["hops"], 2);
    assert_eq!(calls[5]["structured"]["entities"], 3);
    assert_eq!(calls[5]["structured"]["relations"], 2);
    assert_eq!(calls[5]["structured"]["components"], 1);
    assert_eq!(calls[6]["isError"], true, "a read-only token cannot store: {}", calls[6]);
    assert!(calls[6]["text"][0].as_str().unwrap().contains("write"), "{}", calls[6]);
    assert_eq!(calls[7]["structured"]["status"], "healthy");
    // No model loaded in this aggregator: the semantic search says why instead of pretending.
    assert_eq!(calls[8]["isError"], true);
    assert!(calls[8]["text"][0].as_str().unwrap().contains("embedding model"), "{}", calls[8]);
    Ok(())
}
