//! The `manifest.json` Session-Buddy's cloud sync writes next to each upload.

use serde::Deserialize;

/// A parsed, checked manifest.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    /// The upload's id (also its directory name).
    pub upload_id: String,
    /// The system that uploaded it.
    pub system_id: String,
    /// When it was uploaded (ISO 8601), as the uploader says.
    #[serde(default)]
    pub timestamp: Option<String>,
    /// The uploaded files.
    pub files: Vec<ManifestFile>,
}

/// One uploaded file.
#[derive(Debug, Clone, Deserialize)]
pub struct ManifestFile {
    /// File name (`reflection.duckdb`, `knowledge_graph.duckdb`).
    pub name: String,
    /// Object key, relative to the bucket root the upload was written to.
    pub path: String,
    /// `gzip` or `none`.
    #[serde(default)]
    pub compression: Option<String>,
    /// Hex SHA-256 (of the object or of its decompressed content); empty when the uploader did not compute one.
    #[serde(default)]
    pub checksum: Option<String>,
}

/// Why a manifest is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not the expected JSON.
    #[error("manifest {key} is not a Session-Buddy upload manifest: {reason}")]
    Parse {
        /// The manifest's key.
        key: String,
        /// serde's message.
        reason: String,
    },
    /// The manifest contradicts where it was found, or names something unsafe.
    #[error("manifest {key}: {reason}")]
    Invalid {
        /// The manifest's key.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

impl Manifest {
    /// Parses the manifest found at `key` (`…/systems/<system>/uploads/<upload>/manifest.json`) and checks it
    /// against its location: a manifest may only speak for the system directory it sits in, and its files
    /// must lie in its own upload directory.
    pub fn parse(bytes: &[u8], key: &str, system_dir: &str, upload_dir: &str) -> Result<Manifest, ManifestError> {
        let manifest: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| ManifestError::Parse { key: key.to_owned(), reason: e.to_string() })?;
        let invalid = |reason: String| ManifestError::Invalid { key: key.to_owned(), reason };
        if manifest.system_id != system_dir {
            return Err(invalid(format!(
                "claims system `{}` but is stored under systems/{system_dir}/",
                manifest.system_id
            )));
        }
        let probe =
            akosha_protocol::Record { system_id: manifest.system_id.clone(), id: "x".into(), ..Default::default() };
        if probe.validate().is_err() {
            return Err(invalid(format!("`{}` is not a valid system id", manifest.system_id)));
        }
        if manifest.upload_id != upload_dir {
            return Err(invalid(format!(
                "names upload `{}` but is stored under uploads/{upload_dir}/",
                manifest.upload_id
            )));
        }
        if manifest.files.is_empty() {
            return Err(invalid("lists no files".into()));
        }
        let own_dir = format!("systems/{system_dir}/uploads/{upload_dir}/");
        for file in &manifest.files {
            let name_ok = !file.name.is_empty() && !file.name.contains(['/', '\\']) && file.name != "..";
            if !name_ok || !file.path.ends_with(&format!("/{}", file.name)) || !file.path.contains(&own_dir) {
                return Err(invalid(format!("file `{}` at `{}` lies outside {own_dir}", file.name, file.path)));
            }
            if file.path.split('/').any(|part| part == ".." || part == ".") {
                return Err(invalid(format!("file path `{}` is not canonical", file.path)));
            }
            match file.compression.as_deref() {
                None | Some("" | "none" | "gzip") => {}
                Some(other) => return Err(invalid(format!("file `{}` uses unknown compression `{other}`", file.name))),
            }
        }
        Ok(manifest)
    }
}

impl ManifestFile {
    /// Whether the object is gzip'd (Session-Buddy does not add a `.gz` suffix).
    pub fn gzipped(&self) -> bool {
        self.compression.as_deref() == Some("gzip")
    }

    /// The checksum, if one was given.
    pub fn expected_sha256(&self) -> Option<String> {
        self.checksum.as_deref().map(str::trim).filter(|c| !c.is_empty()).map(str::to_ascii_lowercase)
    }

    /// The key relative to the upload directory's bucket root: the part from `systems/` on.
    pub fn relative_key(&self) -> &str {
        self.path.find("systems/").map_or(self.path.as_str(), |i| &self.path[i..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> std::path::PathBuf {
        crate::crate_path(
            "../../shared/fixtures/session-buddy/cloud_upload_small/systems/edge-host-1/uploads/20261122_094622_edge-host-1/manifest.json",
        )
    }

    #[test]
    fn the_real_manifest_parses() {
        let bytes = std::fs::read(fixture()).unwrap();
        let m = Manifest::parse(&bytes, "k", "edge-host-1", "20261122_094622_edge-host-1").unwrap();
        assert_eq!(m.files.len(), 2);
        assert!(m.files.iter().all(|f| f.gzipped() && f.expected_sha256().is_none()));
        assert_eq!(
            m.files[0].relative_key(),
            "systems/edge-host-1/uploads/20261122_094622_edge-host-1/reflection.duckdb"
        );
    }

    #[test]
    fn a_manifest_cannot_speak_for_another_system_or_reach_outside_its_upload() {
        let bytes = std::fs::read(fixture()).unwrap();
        let err = Manifest::parse(&bytes, "k", "other-host", "20261122_094622_edge-host-1").unwrap_err();
        assert!(err.to_string().contains("claims system `edge-host-1` but is stored under systems/other-host/"));
        let evil = String::from_utf8(bytes)
            .unwrap()
            .replace("uploads/20261122_094622_edge-host-1/reflection.duckdb", "uploads/other/reflection.duckdb");
        let err = Manifest::parse(evil.as_bytes(), "k", "edge-host-1", "20261122_094622_edge-host-1").unwrap_err();
        assert!(err.to_string().contains("lies outside"), "{err}");
        let err = Manifest::parse(b"{\"not\": 1}", "k", "a", "b").unwrap_err();
        assert!(err.to_string().starts_with("manifest k is not a Session-Buddy upload manifest"), "{err}");
    }
}
