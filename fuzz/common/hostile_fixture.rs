// Fixed key material for the hostile-input fuzz targets (bearer tokens, envelopes): the seeds
// in the corpora were made with it, so a replay years later still verifies and opens them.
// These keys protect nothing; they exist only here.

/// A P-256 PKCS#8 key that signs the seed tokens (kid "fuzz-kid").
pub const TOKEN_KEY_PKCS8_B64: &str = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgqzpUUd9+kroTCkmERle25aIMGkJKJlyxHslNHbjL1qGhRANCAATmH4dU64XVs2LqH9pFgiRcYAmUCHkIeXvBTHvL0jtebX4E4utIgDgfMDg2qzF7OZVext58kPI6jmFHv/QpZ/C1";

/// A keyring whose key wraps the seed envelopes' data keys.
pub const KEYRING_TOML: &str = r#"primary = "fuzz-kek"

[[keys]]
id = "fuzz-kek"
created = "2026-11-29T00:00:00Z"
key_base64 = "5Kg8/v5N9swB9+GDiYCZPDZ2PpQZH0sv8mC7cHG0CYg="
"#;

pub const ISSUER: &str = "https://idp.fuzz.invalid/";
pub const AUDIENCE: &str = "portcullis";
