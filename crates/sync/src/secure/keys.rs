//! Static keys: generation, the key files, fingerprints and the allowed-peer list.
//!
//! A node has one X25519 static key pair. The private key lives in a file of mode 0600
//! holding one line, `tidemark-secret-<64 hex digits>`; loading refuses a file that group or
//! others can read, as ssh does. The public key is one line, `tidemark-public-<64 hex
//! digits>`, optionally followed by a space and a comment (the node name); it is what a
//! person copies to the other node's allowed-peer file.
//!
//! Pairing, as a person follows it: run `tidemark keygen` on each node; it prints the
//! public key line and its [`Fingerprint`]. Copy each node's public key line into the
//! other's allowed-peer file; on the first connection each side logs the peer's
//! fingerprint, and the person compares it with what `keygen` printed on the other
//! machine (read aloud over the phone, say): 32 hex digits in 8 groups.
//!
//! Invariants: a private key is never printed (`Debug` shows the public key and fingerprint
//! only), never written to a file that already exists, and never written with a mode other
//! than 0600.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::str::FromStr;

use snow::params::DHChoice;
use snow::resolvers::{CryptoResolver, DefaultResolver};

use super::SecureError;
use super::handshake::NOISE_PARAMS;

/// Length of an X25519 key.
pub const KEY_LEN: usize = 32;
/// Prefix of a public key's text form.
pub const PUBLIC_KEY_PREFIX: &str = "tidemark-public-";
/// Prefix of a private key's text form.
pub const SECRET_KEY_PREFIX: &str = "tidemark-secret-";
/// Longest key file read (a key line, a comment, a newline).
const MAX_KEY_FILE_LEN: u64 = 4096;
/// Longest allowed-peer file read.
const MAX_ALLOWED_FILE_LEN: u64 = 1 << 20;
/// BLAKE3 key-derivation context of fingerprints.
const FINGERPRINT_CONTEXT: &str = "tidemark 2026-11 public key fingerprint v1";

/// A node's static public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; KEY_LEN]);

impl PublicKey {
    /// The short form a person compares (see [`Fingerprint`]).
    pub fn fingerprint(&self) -> Fingerprint {
        let digest = blake3::derive_key(FINGERPRINT_CONTEXT, &self.0);
        let mut f = [0; 16];
        f.copy_from_slice(&digest[..16]);
        Fingerprint(f)
    }

    /// Parses the text form `tidemark-public-<64 hex digits>` (surrounding whitespace
    /// ignored; a comment after the key is not part of it).
    pub fn parse(text: &str) -> Result<Self, SecureError> {
        parse_key(text.trim(), PUBLIC_KEY_PREFIX, "public key").map(Self)
    }

    /// Writes the key as one line, with an optional comment, to a new file at `path`
    /// (mode 0644). Refuses to replace an existing file.
    pub fn save(&self, path: &Path, comment: Option<&str>) -> Result<(), SecureError> {
        let mut line = self.to_string();
        if let Some(c) = comment {
            if c.chars().any(char::is_control) {
                return Err(SecureError::BadKey {
                    object: path.display().to_string(),
                    reason: "the comment must be one line without control characters".to_owned(),
                });
            }
            line.push(' ');
            line.push_str(c);
        }
        line.push('\n');
        write_new_file(path, line.as_bytes(), 0o644)
    }

    /// Reads a public key file written by [`PublicKey::save`].
    pub fn load(path: &Path) -> Result<Self, SecureError> {
        let text = read_small_file(path, MAX_KEY_FILE_LEN)?;
        let first = text.split_whitespace().next().unwrap_or("");
        parse_key(first, PUBLIC_KEY_PREFIX, &path.display().to_string()).map(Self)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(PUBLIC_KEY_PREFIX)?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint())
    }
}

impl FromStr for PublicKey {
    type Err = SecureError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// The human-comparable form of a public key: the first 128 bits of a BLAKE3 derived key
/// of it, as 8 groups of 4 hex digits (`3f9a-c1d2-07be-55e1-9a0c-4b7d-e2f3-1086`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 16]);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, pair) in self.0.chunks(2).enumerate() {
            if i > 0 {
                f.write_str("-")?;
            }
            write!(f, "{:02x}{:02x}", pair[0], pair[1])?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// A node's static key pair.
#[derive(Clone)]
pub struct Keypair {
    secret: [u8; KEY_LEN],
    public: PublicKey,
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keypair").field("public", &self.public).finish_non_exhaustive()
    }
}

impl Keypair {
    /// A new key pair from the operating system's random generator.
    pub fn generate() -> Result<Self, SecureError> {
        let params = NOISE_PARAMS.parse().expect("the Noise parameters are valid");
        let pair = snow::Builder::new(params)
            .generate_keypair()
            .map_err(|source| SecureError::KeyGeneration { source })?;
        let mut secret = [0; KEY_LEN];
        secret.copy_from_slice(&pair.private);
        let mut public = [0; KEY_LEN];
        public.copy_from_slice(&pair.public);
        Ok(Self { secret, public: PublicKey(public) })
    }

    /// The key pair of a private key (its public key is derived).
    pub fn from_secret(secret: [u8; KEY_LEN]) -> Self {
        let mut dh = DefaultResolver
            .resolve_dh(&DHChoice::Curve25519)
            .expect("the default resolver has X25519");
        dh.set(&secret);
        let mut public = [0; KEY_LEN];
        public.copy_from_slice(dh.pubkey());
        Self { secret, public: PublicKey(public) }
    }

    /// The public key.
    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// The public key's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.public.fingerprint()
    }

    pub(crate) fn secret(&self) -> &[u8; KEY_LEN] {
        &self.secret
    }

    /// Writes the private key to a new file at `path`, mode 0600. Refuses to replace an
    /// existing file, so a key is never lost by accident.
    pub fn save(&self, path: &Path) -> Result<(), SecureError> {
        let mut line = String::with_capacity(SECRET_KEY_PREFIX.len() + 2 * KEY_LEN + 1);
        line.push_str(SECRET_KEY_PREFIX);
        for b in self.secret {
            line.push_str(&format!("{b:02x}"));
        }
        line.push('\n');
        write_new_file(path, line.as_bytes(), 0o600)
    }

    /// Reads a private key file written by [`Keypair::save`]. Refuses a file that group or
    /// others may read.
    pub fn load(path: &Path) -> Result<Self, SecureError> {
        check_private_mode(path)?;
        let text = read_small_file(path, MAX_KEY_FILE_LEN)?;
        let secret = parse_key(text.trim(), SECRET_KEY_PREFIX, &path.display().to_string())?;
        Ok(Self::from_secret(secret))
    }
}

#[cfg(unix)]
fn check_private_mode(path: &Path) -> Result<(), SecureError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(path).map_err(|source| SecureError::KeyFileIo {
        op: "reading",
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SecureError::KeyFilePermissions { path: path.to_owned(), mode });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private_mode(_path: &Path) -> Result<(), SecureError> {
    Ok(())
}

fn write_new_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), SecureError> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(|source| SecureError::KeyFileIo {
        op: "creating",
        path: path.to_owned(),
        source,
    })?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(|source| SecureError::KeyFileIo {
        op: "writing",
        path: path.to_owned(),
        source,
    })
}

fn read_small_file(path: &Path, max: u64) -> Result<String, SecureError> {
    let io_err = |source| SecureError::KeyFileIo { op: "reading", path: path.to_owned(), source };
    let len = fs::metadata(path).map_err(io_err)?.len();
    if len > max {
        return Err(SecureError::BadKey {
            object: path.display().to_string(),
            reason: format!("the file is {len} bytes, more than the {max} a key file may have"),
        });
    }
    let bytes = fs::read(path).map_err(io_err)?;
    String::from_utf8(bytes).map_err(|_| SecureError::BadKey {
        object: path.display().to_string(),
        reason: "the file is not UTF-8 text".to_owned(),
    })
}

fn parse_key(text: &str, prefix: &str, object: &str) -> Result<[u8; KEY_LEN], SecureError> {
    let bad = |reason: String| SecureError::BadKey { object: object.to_owned(), reason };
    let Some(hex) = text.strip_prefix(prefix) else {
        let shown: String = text.chars().take(24).collect();
        return Err(bad(format!("expected a key starting with {prefix:?}, found {shown:?}")));
    };
    if hex.len() != 2 * KEY_LEN {
        return Err(bad(format!(
            "expected {} hex digits after {prefix:?}, found {} characters",
            2 * KEY_LEN,
            hex.len()
        )));
    }
    let mut key = [0; KEY_LEN];
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16);
        match (digit(pair[0]), digit(pair[1])) {
            (Some(h), Some(l)) => key[i] = (h * 16 + l) as u8,
            _ => return Err(bad(format!("character {} of the key is not a hex digit", 2 * i))),
        }
    }
    Ok(key)
}

/// One entry of the allowed-peer list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedPeer {
    /// The peer's public key.
    pub key: PublicKey,
    /// What the line said after the key (the peer's node name, usually).
    pub comment: String,
}

/// The static keys a node accepts connections from and connects to. Empty: nobody.
///
/// The file form is one public key line per peer (`tidemark-public-<hex> comment`); blank
/// lines and lines starting with `#` are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedPeers {
    peers: Vec<AllowedPeer>,
}

impl AllowedPeers {
    /// A list of the given keys, without comments.
    pub fn from_keys(keys: impl IntoIterator<Item = PublicKey>) -> Self {
        let mut list = Self::default();
        for key in keys {
            list.add(key, "");
        }
        list
    }

    /// Adds a key (once: a key already present keeps its first comment).
    pub fn add(&mut self, key: PublicKey, comment: &str) {
        if !self.contains(&key) {
            self.peers.push(AllowedPeer { key, comment: comment.to_owned() });
        }
    }

    /// True if `key` is allowed.
    pub fn contains(&self, key: &PublicKey) -> bool {
        self.peers.iter().any(|p| p.key == *key)
    }

    /// The entry of `key`, if allowed.
    pub fn get(&self, key: &PublicKey) -> Option<&AllowedPeer> {
        self.peers.iter().find(|p| p.key == *key)
    }

    /// The entries, in file order.
    pub fn iter(&self) -> impl Iterator<Item = &AllowedPeer> {
        self.peers.iter()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// True if no key is allowed.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Parses the file form; `object` names the source in errors.
    pub fn parse(text: &str, object: &str) -> Result<Self, SecureError> {
        let mut list = Self::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, comment) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let key = parse_key(key, PUBLIC_KEY_PREFIX, &format!("{object} line {}", n + 1))?;
            list.add(PublicKey(key), comment.trim());
        }
        Ok(list)
    }

    /// Reads an allowed-peer file.
    pub fn load(path: &Path) -> Result<Self, SecureError> {
        let text = read_small_file(path, MAX_ALLOWED_FILE_LEN)?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The file form.
    pub fn to_text(&self) -> String {
        let mut text = String::new();
        for p in &self.peers {
            text.push_str(&p.key.to_string());
            if !p.comment.is_empty() {
                text.push(' ');
                text.push_str(&p.comment);
            }
            text.push('\n');
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_public_key_matches_generated() {
        let pair = Keypair::generate().unwrap();
        let again = Keypair::from_secret(*pair.secret());
        assert_eq!(again.public(), pair.public());
    }

    #[test]
    fn public_key_text_round_trips_and_rejects_garbage() {
        let key = Keypair::generate().unwrap().public;
        let text = key.to_string();
        assert!(text.starts_with(PUBLIC_KEY_PREFIX));
        assert_eq!(text.len(), PUBLIC_KEY_PREFIX.len() + 64);
        assert_eq!(PublicKey::parse(&format!("  {text}\n")).unwrap(), key);
        for bad in [
            "",
            "tidemark-public-",
            "tidemark-secret-00",
            &text[..text.len() - 1],
            &text.replace('a', "g"),
        ] {
            if bad != text {
                assert!(PublicKey::parse(bad).is_err(), "{bad:?} parsed");
            }
        }
    }

    #[test]
    fn fingerprint_is_eight_groups_of_four_hex_digits() {
        let f = PublicKey([7; 32]).fingerprint().to_string();
        assert_eq!(f.len(), 39);
        assert_eq!(f.split('-').count(), 8);
        assert!(f.split('-').all(|g| g.len() == 4 && g.chars().all(|c| c.is_ascii_hexdigit())));
        assert_ne!(PublicKey([7; 32]).fingerprint(), PublicKey([8; 32]).fingerprint());
    }

    #[test]
    fn allowed_peers_file_form() {
        let a = Keypair::generate().unwrap().public;
        let b = Keypair::generate().unwrap().public;
        let text = format!("# peers\n\n{a} target-1\n  {b}\n{a} again\n");
        let list = AllowedPeers::parse(&text, "allowed").unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list.get(&a).unwrap().comment, "target-1");
        assert!(list.contains(&b));
        assert_eq!(AllowedPeers::parse(&list.to_text(), "again").unwrap(), list);
        let err = AllowedPeers::parse("tidemark-public-zz\n", "allowed").unwrap_err();
        assert!(err.to_string().contains("allowed line 1"), "{err}");
    }

    #[test]
    fn key_files_have_the_right_modes_and_are_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let pair = Keypair::generate().unwrap();
        let secret = dir.path().join("node.key");
        let public = dir.path().join("node.pub");
        pair.save(&secret).unwrap();
        pair.public().save(&public, Some("node-a")).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&secret).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        assert_eq!(Keypair::load(&secret).unwrap().public(), pair.public());
        assert_eq!(PublicKey::load(&public).unwrap(), *pair.public());
        let again = pair.save(&secret).unwrap_err();
        assert!(matches!(again, SecureError::KeyFileIo { op: "creating", .. }), "{again}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&secret, fs::Permissions::from_mode(0o644)).unwrap();
            let err = Keypair::load(&secret).unwrap_err();
            assert!(matches!(err, SecureError::KeyFilePermissions { mode: 0o644, .. }), "{err}");
            assert!(err.to_string().contains("chmod 600"));
        }
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let pair = Keypair::from_secret([0xab; 32]);
        let shown = format!("{pair:?}");
        assert!(!shown.contains("abab"), "{shown}");
        assert!(shown.contains(&pair.fingerprint().to_string()));
    }
}
