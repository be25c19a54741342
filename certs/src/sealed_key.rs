//! Private keys at rest under a passphrase: PKCS#8 `EncryptedPrivateKeyInfo` (PBES2 with
//! scrypt and AES-256-CBC), PEM-armoured as `ENCRYPTED PRIVATE KEY`, the form
//! `openssl pkcs8` also reads. The issuer keeps its CA keys this way when given a
//! passphrase.

use pkcs8::der::Decode;
use pkcs8::der::pem::PemLabel;
use pkcs8::pkcs5::pbes2;
use pkcs8::{EncryptedPrivateKeyInfo, LineEnding, PrivateKeyInfo, SecretDocument};
use zeroize::Zeroizing;

use crate::IssueError;
use crate::issue::{CaError, CryptoError};

/// Encrypts a PKCS#8 private key (PEM `PRIVATE KEY`) under `passphrase`.
pub fn encrypt_key_pem(key_pem: &str, passphrase: &[u8]) -> Result<Zeroizing<String>, IssueError> {
    if passphrase.is_empty() {
        return Err(CaError::EmptyPassphrase.into());
    }
    let (label, doc) = SecretDocument::from_pem(key_pem).map_err(CaError::KeyPem)?;
    if label != "PRIVATE KEY" {
        return Err(CaError::NotPkcs8(label.to_owned()).into());
    }
    let info = PrivateKeyInfo::from_der(doc.as_bytes()).map_err(CaError::KeyDer)?;
    let mut salt = [0u8; 16];
    let mut iv = [0u8; 16];
    aws_lc_rs::rand::fill(&mut salt).map_err(|_| CryptoError::NoRandomness)?;
    aws_lc_rs::rand::fill(&mut iv).map_err(|_| CryptoError::NoRandomness)?;
    let scrypt = pkcs8::pkcs5::scrypt::Params::new(SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P, 32)
        .map_err(CryptoError::Scrypt)?;
    let params =
        pbes2::Parameters::scrypt_aes256cbc(scrypt, &salt, &iv).map_err(CryptoError::Pbes2)?;
    let encrypted = info
        .encrypt_with_params(params, passphrase)
        .map_err(CryptoError::Encrypt)?;
    let pem = encrypted
        .to_pem(EncryptedPrivateKeyInfo::PEM_LABEL, LineEnding::LF)
        .map_err(CryptoError::Encode)?;
    Ok(pem)
}

/// Whether PEM text holds an encrypted private key.
pub fn is_encrypted_key_pem(pem: &str) -> bool {
    pem.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----")
}

/// Decrypts an `ENCRYPTED PRIVATE KEY` into PKCS#8 PEM. A wrong passphrase fails (CBC
/// padding, then the key's own structure), with an error that says so.
pub fn decrypt_key_pem(pem: &str, passphrase: &[u8]) -> Result<Zeroizing<String>, IssueError> {
    let (label, doc) = SecretDocument::from_pem(pem).map_err(CaError::EncryptedPem)?;
    if label != EncryptedPrivateKeyInfo::PEM_LABEL {
        return Err(CaError::NotEncrypted(label.to_owned()).into());
    }
    let info = EncryptedPrivateKeyInfo::from_der(doc.as_bytes()).map_err(CaError::EncryptedDer)?;
    let wrong = || CaError::WrongPassphrase;
    let plain = info.decrypt(passphrase).map_err(|_| wrong())?;
    PrivateKeyInfo::from_der(plain.as_bytes()).map_err(|_| wrong())?;
    let pem = plain
        .to_pem("PRIVATE KEY", LineEnding::LF)
        .map_err(CryptoError::Encode)?;
    Ok(pem)
}

/// scrypt cost: N = 2^15, r = 8, p = 1 (32 MiB, a fraction of a second, once at start).
const SCRYPT_LOG_N: u8 = 15;
const SCRYPT_R: u32 = 8;
const SCRYPT_P: u32 = 1;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeyAlgorithm;

    #[test]
    fn a_key_round_trips_under_its_passphrase_only() {
        let key = KeyAlgorithm::EcdsaP256.generate().unwrap().serialize_pem();
        let sealed = encrypt_key_pem(&key, b"correct horse").unwrap();
        assert!(is_encrypted_key_pem(&sealed));
        assert!(!is_encrypted_key_pem(&key));
        assert!(
            !sealed.contains(&key[40..80]),
            "plaintext key material leaked"
        );
        assert_eq!(
            decrypt_key_pem(&sealed, b"correct horse").unwrap().as_str(),
            key
        );
        let e = decrypt_key_pem(&sealed, b"wrong horse").unwrap_err();
        assert!(
            matches!(e, IssueError::Ca(CaError::WrongPassphrase)),
            "{e:?}"
        );
        assert!(e.to_string().contains("wrong passphrase"), "{e}");
        // Each encryption draws its own salt and IV.
        assert_ne!(*encrypt_key_pem(&key, b"correct horse").unwrap(), *sealed);
    }

    #[test]
    fn refuses_empty_passphrases_and_wrong_labels() {
        let key = KeyAlgorithm::EcdsaP256.generate().unwrap().serialize_pem();
        assert!(matches!(
            encrypt_key_pem(&key, b""),
            Err(IssueError::Ca(CaError::EmptyPassphrase))
        ));
        match decrypt_key_pem(&key, b"x") {
            Err(IssueError::Ca(CaError::NotEncrypted(label))) => assert_eq!(label, "PRIVATE KEY"),
            other => panic!("{other:?}"),
        }
        let sealed = encrypt_key_pem(&key, b"x").unwrap();
        assert!(matches!(
            encrypt_key_pem(&sealed, b"x"),
            Err(IssueError::Ca(CaError::NotPkcs8(_)))
        ));
        assert!(matches!(
            encrypt_key_pem("not pem", b"x"),
            Err(IssueError::Ca(CaError::KeyPem(_)))
        ));
    }
}
