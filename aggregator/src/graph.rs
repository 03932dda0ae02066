//! Knowledge-graph queries over the `entity` and `relation` records of every system: neighbourhoods, bounded
//! shortest paths and statistics.
//!
//! A node is an entity `(system_id, id)`; a relation's `from`/`to` are entity ids of the same system (that is
//! how Session-Buddy stores them). An entity may be named by id or by name (case-insensitive); a name can
//! match entities in several systems, and every match is a starting point. Traversal is breadth-first, one
//! set-based query per hop, following relations in both directions, and stops at a node budget so that a hub
//! cannot make one request read the whole graph.

use std::collections::{HashMap, HashSet, VecDeque};

use duckdb::{Connection, ToSql};
use serde::Serialize;

use crate::hot::{HotError, stage_keys};

/// Deepest neighbourhood a query may ask for.
pub const MAX_DEPTH: u32 = 5;
/// Longest path searched for.
pub const MAX_HOPS: u32 = 8;
/// Nodes one traversal may visit before it stops (and says so).
pub const NODE_BUDGET: usize = 10_000;

/// An entity.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Node {
    /// System the entity belongs to.
    pub system_id: String,
    /// Entity id.
    pub id: String,
    /// Entity name.
    pub name: Option<String>,
    /// Entity type.
    pub entity_type: Option<String>,
    /// Hops from the nearest starting entity.
    pub depth: u32,
}

/// A relation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Edge {
    /// System the relation belongs to.
    pub system_id: String,
    /// Relation id.
    pub id: String,
    /// Source entity id.
    pub from: String,
    /// Target entity id.
    pub to: String,
    /// Relation type.
    pub relation_type: Option<String>,
    /// Weight.
    pub weight: Option<f64>,
}

/// The answer to a neighbourhood query.
#[derive(Debug, Clone, Serialize)]
pub struct Neighbourhood {
    /// The entities the query named.
    pub start: Vec<Node>,
    /// Every entity reached (starting ones included), nearest first.
    pub nodes: Vec<Node>,
    /// Relations between reached entities that were followed.
    pub edges: Vec<Edge>,
    /// The node budget stopped the traversal early.
    pub truncated: bool,
}

/// A path between two entities.
#[derive(Debug, Clone, Serialize)]
pub struct GraphPath {
    /// Entities from the source to the target.
    pub nodes: Vec<Node>,
    /// Relations along the way, in order.
    pub edges: Vec<Edge>,
    /// Number of relations.
    pub hops: usize,
}

/// Graph statistics.
#[derive(Debug, Clone, Serialize)]
pub struct GraphStats {
    /// Entities.
    pub entities: u64,
    /// Relations.
    pub relations: u64,
    /// Entities and relations per system.
    pub systems: Vec<SystemGraphCount>,
    /// Most frequent entity types.
    pub entity_types: Vec<(String, u64)>,
    /// Most frequent relation types.
    pub relation_types: Vec<(String, u64)>,
    /// Mean relations per entity (each relation counts for both ends).
    pub average_degree: f64,
    /// Best-connected entities.
    pub hubs: Vec<(Node, u64)>,
    /// Connected components (relations taken as undirected), isolated entities included.
    pub components: u64,
    /// Size of the largest component.
    pub largest_component: u64,
    /// Relations whose `from` or `to` names no stored entity.
    pub dangling_relations: u64,
}

/// Per-system graph size.
#[derive(Debug, Clone, Serialize)]
pub struct SystemGraphCount {
    /// System id.
    pub system_id: String,
    /// Entities.
    pub entities: u64,
    /// Relations.
    pub relations: u64,
}

type Key = (String, String);

/// `AND system_id IN (?, …)` for a non-empty system filter, with its parameters.
pub(crate) fn system_clause<'a>(column: &str, systems: &'a [String], params: &mut Vec<&'a dyn ToSql>) -> String {
    if systems.is_empty() {
        return String::new();
    }
    params.extend(systems.iter().map(|s| s as &dyn ToSql));
    format!(" AND {column} IN ({})", vec!["?"; systems.len()].join(", "))
}

/// `AND ts >= … AND ts < …` for the bounds given (microseconds since the epoch), with their parameters.
pub(crate) fn time_clause<'a>(
    since_us: &'a Option<i64>,
    until_us: &'a Option<i64>,
    params: &mut Vec<&'a dyn ToSql>,
) -> String {
    let mut sql = String::new();
    if let Some(since) = since_us {
        sql.push_str(" AND ts >= make_timestamp(?)");
        params.push(since);
    }
    if let Some(until) = until_us {
        sql.push_str(" AND ts < make_timestamp(?)");
        params.push(until);
    }
    sql
}

/// The entities `entity` names (an id, or a name compared case-insensitively).
pub fn resolve(conn: &Connection, entity: &str, systems: &[String]) -> Result<Vec<Node>, HotError> {
    let mut params: Vec<&dyn ToSql> = vec![&entity, &entity];
    let clause = system_clause("system_id", systems, &mut params);
    let sql = format!(
        "SELECT system_id, id, name, category FROM all_entity WHERE (id = ? OR lower(name) = lower(?)){clause} \
         ORDER BY system_id, id LIMIT 1000"
    );
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(params.as_slice(), |row| {
        Ok(Node { system_id: row.get(0)?, id: row.get(1)?, name: row.get(2)?, entity_type: row.get(3)?, depth: 0 })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Relations touching any of `frontier` (both directions), optionally of one type.
fn edges_of(conn: &Connection, frontier: &[Key], relation_type: Option<&str>) -> Result<Vec<Edge>, HotError> {
    stage_keys(conn, "lookup_keys", frontier.iter().map(|(s, i)| (s.as_str(), i.as_str())))?;
    let type_clause = if relation_type.is_some() { " AND r.relation_type = ?" } else { "" };
    let sql = format!(
        "SELECT r.system_id, r.id, r.from_id, r.to_id, r.relation_type, r.weight FROM all_relation r \
         JOIN lookup_keys k ON r.system_id = k.system_id AND r.from_id = k.id WHERE r.from_id IS NOT NULL \
         AND r.to_id IS NOT NULL{type_clause} \
         UNION \
         SELECT r.system_id, r.id, r.from_id, r.to_id, r.relation_type, r.weight FROM all_relation r \
         JOIN lookup_keys k ON r.system_id = k.system_id AND r.to_id = k.id WHERE r.from_id IS NOT NULL \
         AND r.to_id IS NOT NULL{type_clause} \
         ORDER BY 1, 2"
    );
    let mut stmt = conn.prepare(&sql)?;
    let params: Vec<&dyn ToSql> = match &relation_type {
        Some(t) => vec![t, t],
        None => Vec::new(),
    };
    let rows = stmt.query_map(params.as_slice(), |row| {
        Ok(Edge {
            system_id: row.get(0)?,
            id: row.get(1)?,
            from: row.get(2)?,
            to: row.get(3)?,
            relation_type: row.get(4)?,
            weight: row.get(5)?,
        })
    })?;
    let edges = rows.collect::<Result<_, _>>()?;
    conn.execute_batch("DELETE FROM lookup_keys")?;
    Ok(edges)
}

/// Names and types of `keys`; a key without a stored entity (a dangling relation end) keeps its id only.
fn describe(conn: &Connection, keys: &[(Key, u32)]) -> Result<Vec<Node>, HotError> {
    stage_keys(conn, "lookup_keys", keys.iter().map(|((s, i), _)| (s.as_str(), i.as_str())))?;
    let mut stmt =
        conn.prepare("SELECT system_id, id, name, category FROM all_entity JOIN lookup_keys USING (system_id, id)")?;
    let mut found: HashMap<Key, (Option<String>, Option<String>)> = HashMap::new();
    let rows = stmt.query_map([], |row| Ok(((row.get(0)?, row.get(1)?), (row.get(2)?, row.get(3)?))))?;
    for row in rows {
        let (key, described) = row?;
        found.insert(key, described);
    }
    conn.execute_batch("DELETE FROM lookup_keys")?;
    Ok(keys
        .iter()
        .map(|((system_id, id), depth)| {
            let (name, entity_type) = found.get(&(system_id.clone(), id.clone())).cloned().unwrap_or_default();
            Node { system_id: system_id.clone(), id: id.clone(), name, entity_type, depth: *depth }
        })
        .collect())
}

/// Entities within `depth` relations of `entity`.
pub fn neighbours(
    conn: &Connection,
    entity: &str,
    systems: &[String],
    relation_type: Option<&str>,
    depth: u32,
) -> Result<Neighbourhood, HotError> {
    let start = resolve(conn, entity, systems)?;
    let depth = depth.clamp(1, MAX_DEPTH);
    let mut seen: HashMap<Key, u32> = start.iter().map(|n| ((n.system_id.clone(), n.id.clone()), 0)).collect();
    let mut order: Vec<(Key, u32)> = seen.iter().map(|(k, d)| (k.clone(), *d)).collect();
    order.sort();
    let mut frontier: Vec<Key> = order.iter().map(|(k, _)| k.clone()).collect();
    let mut edges: Vec<Edge> = Vec::new();
    let mut edge_ids: HashSet<Key> = HashSet::new();
    let mut truncated = false;
    for hop in 1..=depth {
        if frontier.is_empty() {
            break;
        }
        let mut next = Vec::new();
        for edge in edges_of(conn, &frontier, relation_type)? {
            for end in [&edge.from, &edge.to] {
                let key = (edge.system_id.clone(), end.clone());
                if !seen.contains_key(&key) {
                    if seen.len() >= NODE_BUDGET {
                        truncated = true;
                        continue;
                    }
                    seen.insert(key.clone(), hop);
                    order.push((key.clone(), hop));
                    next.push(key);
                }
            }
            let both_seen = seen.contains_key(&(edge.system_id.clone(), edge.from.clone()))
                && seen.contains_key(&(edge.system_id.clone(), edge.to.clone()));
            if both_seen && edge_ids.insert((edge.system_id.clone(), edge.id.clone())) {
                edges.push(edge);
            }
        }
        frontier = next;
    }
    let nodes = describe(conn, &order)?;
    Ok(Neighbourhood { start, nodes, edges, truncated })
}

/// A shortest path (fewest relations, either direction) from `from` to `to`, at most `max_hops` long.
pub fn shortest_path(
    conn: &Connection,
    from: &str,
    to: &str,
    systems: &[String],
    max_hops: u32,
) -> Result<Option<GraphPath>, HotError> {
    let sources = resolve(conn, from, systems)?;
    let targets: HashSet<Key> = resolve(conn, to, systems)?.into_iter().map(|n| (n.system_id, n.id)).collect();
    if sources.is_empty() || targets.is_empty() {
        return Ok(None);
    }
    let max_hops = max_hops.clamp(1, MAX_HOPS);
    // Breadth-first from every source at once; `came_from` records the edge that first reached each node.
    let mut came_from: HashMap<Key, Option<(Key, Edge)>> = HashMap::new();
    let mut queue: VecDeque<Key> = VecDeque::new();
    for s in &sources {
        let key = (s.system_id.clone(), s.id.clone());
        came_from.insert(key.clone(), None);
        queue.push_back(key);
    }
    let mut found = sources.iter().map(|s| (s.system_id.clone(), s.id.clone())).find(|k| targets.contains(k));
    let mut frontier: Vec<Key> = queue.drain(..).collect();
    let mut hop = 0;
    while found.is_none() && !frontier.is_empty() && hop < max_hops && came_from.len() < NODE_BUDGET {
        hop += 1;
        let mut next = Vec::new();
        for edge in edges_of(conn, &frontier, None)? {
            let frontier_set: HashSet<&Key> = frontier.iter().collect();
            for (near, far) in [(&edge.from, &edge.to), (&edge.to, &edge.from)] {
                let near_key = (edge.system_id.clone(), near.clone());
                let far_key = (edge.system_id.clone(), far.clone());
                if frontier_set.contains(&near_key) && !came_from.contains_key(&far_key) {
                    came_from.insert(far_key.clone(), Some((near_key, edge.clone())));
                    if targets.contains(&far_key) && found.is_none() {
                        found = Some(far_key.clone());
                    }
                    next.push(far_key);
                }
            }
        }
        next.sort();
        frontier = next;
    }
    let Some(mut at) = found else { return Ok(None) };
    let mut keys = vec![at.clone()];
    let mut edges = Vec::new();
    while let Some(Some((previous, edge))) = came_from.get(&at) {
        edges.push(edge.clone());
        keys.push(previous.clone());
        at = previous.clone();
    }
    keys.reverse();
    edges.reverse();
    let depths: Vec<(Key, u32)> = keys.into_iter().enumerate().map(|(i, k)| (k, i as u32)).collect();
    let nodes = describe(conn, &depths)?;
    Ok(Some(GraphPath { hops: edges.len(), nodes, edges }))
}

/// Counts, type distributions, degrees and connectivity of the graph of `systems` (all when empty).
pub fn statistics(conn: &Connection, systems: &[String]) -> Result<GraphStats, HotError> {
    let mut params: Vec<&dyn ToSql> = Vec::new();
    let clause = system_clause("system_id", systems, &mut params);
    let where_clause = if clause.is_empty() { String::new() } else { format!(" WHERE TRUE{clause}") };
    let pairs = |sql: String| -> Result<Vec<(String, u64)>, HotError> {
        let mut stmt = conn.prepare(&sql)?;
        let rows =
            stmt.query_map(params.as_slice(), |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    };
    let entity_counts = pairs(format!("SELECT system_id, count(*) FROM all_entity{where_clause} GROUP BY 1"))?;
    let relation_counts = pairs(format!("SELECT system_id, count(*) FROM all_relation{where_clause} GROUP BY 1"))?;
    let entity_types = pairs(format!(
        "SELECT coalesce(category, '(none)'), count(*) FROM all_entity{where_clause} GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 20"
    ))?;
    let relation_types = pairs(format!(
        "SELECT coalesce(relation_type, '(none)'), count(*) FROM all_relation{where_clause} GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 20"
    ))?;
    let mut systems_out: HashMap<String, SystemGraphCount> = HashMap::new();
    for (system_id, n) in &entity_counts {
        systems_out
            .entry(system_id.clone())
            .or_insert(SystemGraphCount { system_id: system_id.clone(), entities: 0, relations: 0 })
            .entities = *n;
    }
    for (system_id, n) in &relation_counts {
        systems_out
            .entry(system_id.clone())
            .or_insert(SystemGraphCount { system_id: system_id.clone(), entities: 0, relations: 0 })
            .relations = *n;
    }
    let mut systems_out: Vec<SystemGraphCount> = systems_out.into_values().collect();
    systems_out.sort_by(|a, b| a.system_id.cmp(&b.system_id));
    let entities: u64 = entity_counts.iter().map(|(_, n)| n).sum();
    let relations: u64 = relation_counts.iter().map(|(_, n)| n).sum();

    // Connectivity: a union-find over every entity and relation end.
    let mut index: HashMap<Key, usize> = HashMap::new();
    let mut parent: Vec<usize> = Vec::new();
    let mut known: Vec<bool> = Vec::new();
    let mut degree: Vec<u64> = Vec::new();
    let slot = |key: Key, index: &mut HashMap<Key, usize>, parent: &mut Vec<usize>| -> usize {
        *index.entry(key).or_insert_with(|| {
            parent.push(parent.len());
            parent.len() - 1
        })
    };
    {
        let mut stmt = conn.prepare(&format!("SELECT system_id, id FROM all_entity{where_clause}"))?;
        let mut rows = stmt.query(params.as_slice())?;
        while let Some(row) = rows.next()? {
            let i = slot((row.get(0)?, row.get(1)?), &mut index, &mut parent);
            known.resize(parent.len(), false);
            known[i] = true;
        }
    }
    let mut dangling = 0;
    {
        let sql = format!(
            "SELECT system_id, from_id, to_id FROM all_relation{} from_id IS NOT NULL AND to_id IS NOT NULL",
            if where_clause.is_empty() { " WHERE".to_string() } else { format!("{where_clause} AND") }
        );
        let mut stmt = conn.prepare(&sql)?;
        let mut rows = stmt.query(params.as_slice())?;
        while let Some(row) = rows.next()? {
            let system: String = row.get(0)?;
            let a = slot((system.clone(), row.get(1)?), &mut index, &mut parent);
            let b = slot((system, row.get(2)?), &mut index, &mut parent);
            known.resize(parent.len(), false);
            degree.resize(parent.len(), 0);
            if !known[a] || !known[b] {
                dangling += 1;
            }
            degree[a] += 1;
            degree[b] += 1;
            let (ra, rb) = (find(&mut parent, a), find(&mut parent, b));
            if ra != rb {
                parent[ra] = rb;
            }
        }
    }
    degree.resize(parent.len(), 0);
    let mut sizes: HashMap<usize, u64> = HashMap::new();
    for i in 0..parent.len() {
        let root = find(&mut parent, i);
        *sizes.entry(root).or_default() += 1;
    }
    let mut by_degree: Vec<(usize, u64)> = degree.iter().copied().enumerate().filter(|(_, d)| *d > 0).collect();
    by_degree.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    by_degree.truncate(10);
    let mut keys: Vec<Option<Key>> = vec![None; parent.len()];
    for (key, i) in index {
        keys[i] = Some(key);
    }
    let hub_keys: Vec<(Key, u32)> = by_degree.iter().filter_map(|(i, _)| keys[*i].clone().map(|k| (k, 0))).collect();
    let hubs = describe(conn, &hub_keys)?.into_iter().zip(by_degree.iter().map(|(_, d)| *d)).collect();
    let nodes = parent.len() as u64;
    Ok(GraphStats {
        entities,
        relations,
        systems: systems_out,
        entity_types,
        relation_types,
        average_degree: if nodes == 0 { 0.0 } else { 2.0 * relations as f64 / nodes as f64 },
        hubs,
        components: sizes.len() as u64,
        largest_component: sizes.values().copied().max().unwrap_or(0),
        dangling_relations: dangling,
    })
}

fn find(parent: &mut [usize], mut i: usize) -> usize {
    while parent[i] != i {
        parent[i] = parent[parent[i]];
        i = parent[i];
    }
    i
}

#[cfg(test)]
mod tests {
    use akosha_protocol::{Record, RecordKind};

    use super::*;
    use crate::hot::HotTier;

    fn entity(system: &str, id: &str, name: &str, kind: &str) -> Record {
        Record {
            system_id: system.into(),
            kind: RecordKind::Entity,
            id: id.into(),
            ts: 1,
            name: Some(name.into()),
            category: Some(kind.into()),
            ..Record::default()
        }
    }

    fn relation(system: &str, id: &str, from: &str, to: &str, kind: &str) -> Record {
        Record {
            system_id: system.into(),
            kind: RecordKind::Relation,
            id: id.into(),
            ts: 1,
            from: Some(from.into()),
            to: Some(to.into()),
            relation_type: Some(kind.into()),
            ..Record::default()
        }
    }

    /// a: p → q → r → s, and an island t; b: its own p → x.
    fn graph() -> HotTier {
        let hot = HotTier::open("256MB", 1, None).unwrap();
        hot.insert(&[
            entity("a", "p", "Parser", "module"),
            entity("a", "q", "Queue", "module"),
            entity("a", "r", "Reader", "module"),
            entity("a", "s", "Store", "service"),
            entity("a", "t", "Tools", "module"),
            relation("a", "1", "p", "q", "calls"),
            relation("a", "2", "q", "r", "calls"),
            relation("a", "3", "r", "s", "writes"),
            relation("a", "4", "s", "ghost", "calls"),
            entity("b", "p", "parser", "module"),
            entity("b", "x", "Xml", "library"),
            relation("b", "1", "p", "x", "uses"),
        ])
        .unwrap();
        hot
    }

    #[test]
    fn neighbourhoods_follow_both_directions_by_depth_and_type() {
        let hot = graph();
        let n = hot.read(|c| neighbours(c, "q", &["a".into()], None, 1)).unwrap();
        let ids: Vec<&str> = n.nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids, ["q", "p", "r"]);
        assert_eq!(n.edges.len(), 2);
        let n = hot.read(|c| neighbours(c, "q", &[], Some("calls"), 3)).unwrap();
        let ids: Vec<(&str, u32)> = n.nodes.iter().map(|n| (n.id.as_str(), n.depth)).collect();
        assert_eq!(ids, [("q", 0), ("p", 1), ("r", 1)], "`writes` is not followed");
        // By name, case-insensitively, in every system.
        let n = hot.read(|c| neighbours(c, "PARSER", &[], None, 1)).unwrap();
        assert_eq!(n.start.len(), 2);
        let mut reached: Vec<(&str, &str)> = n.nodes.iter().map(|n| (n.system_id.as_str(), n.id.as_str())).collect();
        reached.sort();
        assert_eq!(reached, [("a", "p"), ("a", "q"), ("b", "p"), ("b", "x")]);
        assert!(hot.read(|c| neighbours(c, "nobody", &[], None, 2)).unwrap().nodes.is_empty());
    }

    #[test]
    fn shortest_paths_are_bounded() {
        let hot = graph();
        let path = hot.read(|c| shortest_path(c, "Parser", "s", &["a".into()], 5)).unwrap().unwrap();
        let names: Vec<&str> = path.nodes.iter().filter_map(|n| n.name.as_deref()).collect();
        assert_eq!(names, ["Parser", "Queue", "Reader", "Store"]);
        assert_eq!(path.hops, 3);
        assert!(hot.read(|c| shortest_path(c, "p", "s", &["a".into()], 2)).unwrap().is_none(), "3 hops > 2");
        // Backwards along the relations works too, and an island is unreachable.
        assert_eq!(hot.read(|c| shortest_path(c, "s", "p", &["a".into()], 5)).unwrap().unwrap().hops, 3);
        assert!(hot.read(|c| shortest_path(c, "p", "t", &["a".into()], 8)).unwrap().is_none());
        assert_eq!(hot.read(|c| shortest_path(c, "q", "q", &[], 3)).unwrap().unwrap().hops, 0);
    }

    #[test]
    fn statistics_count_components_hubs_and_dangling_ends() {
        let hot = graph();
        let s = hot.read(|c| statistics(c, &[])).unwrap();
        assert_eq!((s.entities, s.relations), (7, 5));
        assert_eq!(s.dangling_relations, 1);
        // a: {p,q,r,s,ghost}, {t}; b: {p,x}.
        assert_eq!(s.components, 3);
        assert_eq!(s.largest_component, 5);
        assert_eq!(s.entity_types[0], ("module".to_string(), 5));
        assert_eq!(s.relation_types[0], ("calls".to_string(), 3));
        assert_eq!(s.hubs[0].1, 2);
        let only_b = hot.read(|c| statistics(c, &["b".into()])).unwrap();
        assert_eq!((only_b.entities, only_b.relations, only_b.components), (2, 1, 1));
    }
}
