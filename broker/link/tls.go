package link

import (
	"bytes"
	"crypto/ed25519"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"os"
	"time"
)

// The TLS of node links is mutual and TLS 1.3 only: both ends present a
// certificate and verify the other's, by one of two trust models.
//
//   - SecretTLS: every node derives the same Ed25519 key from the cluster
//     secret (HKDF-SHA256) and a self-signed certificate for it, and accepts
//     a peer only if the peer's certificate carries that public key (key
//     pinning). Whoever knows the secret can pose as a node, as with the
//     HMAC handshake; nobody else can, and a passive observer learns
//     nothing (TLS 1.3 key exchange is ephemeral, so even a secret leaked
//     later does not decrypt recorded traffic).
//   - FileTLS: certificates from files, verified against a CA of the
//     cluster's: any certificate that CA issued is a node.
//
// Hostnames are not verified: links are dialled at addresses gossip
// publishes, and the node's name is proven by the HMAC handshake that runs
// inside TLS.

// secretKeySalt and secretKeyInfo domain-separate the derived TLS key from
// every other use of the cluster secret (gossip, the HMAC handshake).
const (
	secretKeySalt = "rtm-link-tls-v1"
	secretKeyInfo = "ed25519 node key"
)

// SecretTLS returns the link TLS configuration derived from the cluster
// secret (see the trust models above). secret must not be empty.
func SecretTLS(secret string) (*tls.Config, error) {
	if secret == "" {
		return nil, errors.New("link: SecretTLS needs a secret")
	}
	seed, err := hkdf.Key(sha256.New, []byte(secret), []byte(secretKeySalt), secretKeyInfo, ed25519.SeedSize)
	if err != nil {
		return nil, fmt.Errorf("link: derive the TLS key: %w", err)
	}
	priv := ed25519.NewKeyFromSeed(seed)
	pub := priv.Public().(ed25519.PublicKey)
	// Fixed fields and Ed25519's deterministic signatures make every node
	// build the same certificate; only its public key matters to peers.
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "rtm node link"},
		NotBefore:             time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC),
		NotAfter:              time.Date(9999, 12, 31, 23, 59, 59, 0, time.UTC),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, pub, priv)
	if err != nil {
		return nil, fmt.Errorf("link: build the TLS certificate: %w", err)
	}
	verify := func(raw [][]byte, _ [][]*x509.Certificate) error {
		if len(raw) == 0 {
			return errors.New("link: the peer presented no certificate")
		}
		leaf, err := x509.ParseCertificate(raw[0])
		if err != nil {
			return fmt.Errorf("link: the peer's certificate: %w", err)
		}
		if k, ok := leaf.PublicKey.(ed25519.PublicKey); !ok || !bytes.Equal(k, pub) {
			return fmt.Errorf("link: the peer's certificate is not the one derived from cluster.secret (%w)", ErrBadSecret)
		}
		return nil
	}
	return linkTLS(tls.Certificate{Certificate: [][]byte{der}, PrivateKey: priv}, verify), nil
}

// FileTLS returns the link TLS configuration from a PEM certificate (chain)
// and key, accepting peers whose certificate chains to a CA of caFile.
func FileTLS(certFile, keyFile, caFile string) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("link: load the certificate and key: %w", err)
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("link: read the CA: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("link: %s holds no PEM certificate", caFile)
	}
	verify := func(raw [][]byte, _ [][]*x509.Certificate) error {
		if len(raw) == 0 {
			return errors.New("link: the peer presented no certificate")
		}
		certs := make([]*x509.Certificate, len(raw))
		for i, r := range raw {
			c, err := x509.ParseCertificate(r)
			if err != nil {
				return fmt.Errorf("link: the peer's certificate: %w", err)
			}
			certs[i] = c
		}
		inter := x509.NewCertPool()
		for _, c := range certs[1:] {
			inter.AddCert(c)
		}
		if _, err := certs[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter,
			KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
			return fmt.Errorf("link: the peer's certificate: %w", err)
		}
		return nil
	}
	return linkTLS(cert, verify), nil
}

// linkTLS is a configuration both a Server and a Link use: the standard
// verification (which wants a host name) is replaced by verify, on both
// sides.
func linkTLS(cert tls.Certificate, verify func([][]byte, [][]*x509.Certificate) error) *tls.Config {
	return &tls.Config{
		MinVersion:            tls.VersionTLS13,
		Certificates:          []tls.Certificate{cert},
		ClientAuth:            tls.RequireAnyClientCert,
		InsecureSkipVerify:    true, // the client side verifies with verify instead
		VerifyPeerCertificate: verify,
		// Links are long-lived and never resume a session: tickets would
		// be sent for nothing.
		SessionTicketsDisabled: true,
	}
}
