package link

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// testCA is a certificate authority for link TLS tests, with its PEM file.
type testCA struct {
	cert   *x509.Certificate
	key    *ecdsa.PrivateKey
	file   string
	dir    string
	serial int64
}

func newTestCA(t testing.TB, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	dir := t.TempDir()
	ca := &testCA{cert: cert, key: key, dir: dir, file: filepath.Join(dir, name+"-ca.pem"), serial: 1}
	writePEM(t, ca.file, "CERTIFICATE", der)
	return ca
}

// issue writes a certificate for node and its key, and returns the TLS
// configuration of FileTLS with them and ca.
func (ca *testCA) issue(t testing.TB, node string) *tls.Config {
	t.Helper()
	return ca.issueTrusting(t, node, ca.file)
}

// issueTrusting is issue with the peers verified against trustFile.
func (ca *testCA) issueTrusting(t testing.TB, node, trustFile string) *tls.Config {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ca.serial++
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(ca.serial), Subject: pkix.Name{CommonName: node},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile := filepath.Join(ca.dir, node+".pem"), filepath.Join(ca.dir, node+"-key.pem")
	writePEM(t, certFile, "CERTIFICATE", der)
	writePEM(t, keyFile, "EC PRIVATE KEY", kder)
	cfg, err := FileTLS(certFile, keyFile, trustFile)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func writePEM(t testing.TB, file, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(file, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

func secretTLS(t testing.TB, secret string) *tls.Config {
	t.Helper()
	cfg, err := SecretTLS(secret)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// TestTLSHidesPayload (issue 12 item 5): a link through a proxy that
// records every byte both ways delivers a distinctive payload, and with TLS
// (keyed by the secret, or with certificates from a CA) the recording holds
// neither the payload nor the node names; without TLS (the control, which
// shows the recording sees the link) it holds both.
func TestTLSHidesPayload(t *testing.T) {
	ca := newTestCA(t, "cluster")
	const secret = "tls-hides-payload-secret"
	for _, tc := range []struct {
		name           string
		server, dialer *tls.Config
		clear          bool
	}{
		{"secret", secretTLS(t, secret), secretTLS(t, secret), false},
		{"certificates", ca.issue(t, "server-node"), ca.issue(t, "dialer-node"), false},
		{"plaintext control", nil, nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := &recorder{}
			sc, dc := testConfig(t, "server-node"), testConfig(t, "dialer-node")
			sc.Secret, dc.Secret = secret, secret
			sc.TLS, dc.TLS = tc.server, tc.dialer
			s := startServer(t, sc, rec)
			px := newProxy(t, s.Addr())
			px.record.Store(true)
			l := dial(t, "server-node", px.addr(), dc, nil)
			const distinctive = "PAYLOAD-IN-CLEAR-7f3a9c"
			const n = 50
			for i := range n {
				body := append(payload(i, true, 0), distinctive...)
				if !l.Send(Message{Type: typeData, Body: body}, true) {
					t.Fatalf("send %d refused", i)
				}
			}
			waitFor(t, 10*time.Second, rec.count(n))
			for i, m := range rec.messages() {
				if idx, _ := decodePayload(t, m); idx != i || !bytes.HasSuffix(m.Body, []byte(distinctive)) {
					t.Fatalf("message %d: %q", i, m.Body)
				}
			}
			got := px.bytes()
			if len(got) < n*len(distinctive) {
				t.Fatalf("the proxy recorded %d bytes for %d messages of %d", len(got), n, len(distinctive)+9)
			}
			for _, secretText := range []string{distinctive, "dialer-node", "server-node"} {
				if in := bytes.Contains(got, []byte(secretText)); in != tc.clear {
					t.Errorf("%q in the recorded link bytes: %t, want %t", secretText, in, tc.clear)
				}
			}
			if !tc.clear && (got[0] != 0x16 || got[1] != 0x03) { // a TLS handshake record
				t.Errorf("the link does not start with a TLS handshake record: % x", got[:8])
			}
			if st := l.Stats(); st.State != StateUp || st.Connects != 1 {
				t.Errorf("link stats %+v, want up after one connect", st)
			}
		})
	}
}

// TestTLSRefusesWrongPeer: with TLS, a peer that does not hold the key
// derived from the secret, or a certificate of the cluster's CA, cannot
// link, in either role, even when it knows the secret of the HMAC
// handshake; nor can a plaintext peer. Nothing is delivered.
func TestTLSRefusesWrongPeer(t *testing.T) {
	ca, other := newTestCA(t, "cluster"), newTestCA(t, "other")
	for _, tc := range []struct {
		name           string
		server, dialer *tls.Config
		why            string // in the link's last error
	}{
		// In TLS 1.3 the dialer checks the acceptor's certificate first, so
		// it refuses whichever side holds the wrong key.
		{"dialer keyed by another secret", secretTLS(t, testSecret), secretTLS(t, "another-secret"), "not the one derived from cluster.secret"},
		{"acceptor keyed by another secret", secretTLS(t, "another-secret"), secretTLS(t, testSecret), "not the one derived from cluster.secret"},
		{"dialer certificate of another CA", ca.issue(t, "b"), other.issue(t, "a"), "certificate signed by unknown authority"},
		{"acceptor certificate of another CA", other.issue(t, "b"), ca.issue(t, "a"), "certificate signed by unknown authority"},
		// A dialer that accepts the acceptor but presents a certificate the
		// acceptor must refuse: the acceptor's check.
		{"dialer presenting a key of another secret", secretTLS(t, testSecret), presenting(secretTLS(t, testSecret), secretTLS(t, "another-secret")), "tls: "},
		{"dialer presenting a certificate of another CA", ca.issue(t, "b"), other.issueTrusting(t, "a", ca.file), "tls: "},
		{"plaintext dialer", secretTLS(t, testSecret), nil, ""},
		{"plaintext acceptor", nil, secretTLS(t, testSecret), "TLS handshake"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := &recorder{}
			sc, dc := testConfig(t, "b"), testConfig(t, "a")
			sc.TLS, dc.TLS = tc.server, tc.dialer
			s := startServer(t, sc, rec)
			l := dial(t, "b", s.Addr(), dc, nil)
			l.Send(Message{Type: typeData, Body: payload(0, true, 0)}, true)
			waitFor(t, 10*time.Second, func() error {
				if f, h := s.Stats().AuthFailures, l.Stats().HandshakeFailures; f < 2 || h < 2 {
					return fmt.Errorf("%d auth failures on the server, %d handshake failures on the link; want ≥ 2 each", f, h)
				}
				return nil
			})
			st := l.Stats()
			if st.State != StateConnecting || st.Connects != 0 || !strings.Contains(st.LastError, tc.why) {
				t.Errorf("link stats %+v; want connecting, no connects, an error with %q", st, tc.why)
			}
			if n := rec.len(); n != 0 {
				t.Errorf("%d messages delivered to or from the wrong peer", n)
			}
		})
	}
}

// presenting returns verifier with the certificates of presented.
func presenting(verifier, presented *tls.Config) *tls.Config {
	c := verifier.Clone()
	c.Certificates = presented.Certificates
	return c
}

// TestSecretTLSIsDeterministic: every node derives the same certificate
// from one secret, and another from another secret.
func TestSecretTLSIsDeterministic(t *testing.T) {
	a, b, c := secretTLS(t, "s1"), secretTLS(t, "s1"), secretTLS(t, "s2")
	if !bytes.Equal(a.Certificates[0].Certificate[0], b.Certificates[0].Certificate[0]) {
		t.Error("two derivations from one secret differ")
	}
	if bytes.Equal(a.Certificates[0].Certificate[0], c.Certificates[0].Certificate[0]) {
		t.Error("two secrets derive the same certificate")
	}
	if _, err := SecretTLS(""); err == nil {
		t.Error("SecretTLS accepted an empty secret")
	}
}
