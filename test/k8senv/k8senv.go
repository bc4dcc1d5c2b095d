// Package k8senv runs a real Kubernetes control plane for tests: etcd,
// kube-apiserver and kube-controller-manager (Deployments become
// ReplicaSets become Pods; namespaces get their default service account),
// built from their Go modules by the build script beside this file, on
// 127.0.0.1 with certificates of its own, and a kubeconfig for kubectl and
// client-go. There is no scheduler and no kubelet: tests bind pods and play
// the node themselves.
//
// This is test code, not product.
package k8senv

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// ServiceCIDR is the cluster's service range: a block of the benchmark
// range 198.18.0.0/15 the tests use, so that nothing a test sends to a
// ClusterIP could leave the machine.
const ServiceCIDR = "198.19.64.0/18"

// Env is a running control plane.
type Env struct {
	// Dir holds the certificates, etcd's data, the logs and Kubeconfig.
	Dir        string
	Kubeconfig string
	// Server is the API server's URL.
	Server string
	// Bin holds the binaries (kubectl among them).
	Bin string
	// CACert is the cluster CA (PEM) that signed the API server's and the
	// clients' certificates.
	CACert []byte
	// ServiceAccountIssuer is the issuer of service account tokens.
	ServiceAccountIssuer string
}

// Binaries returns the directory holding the control plane's binaries:
// $TRELLIS_K8SENV_BIN, or what the build script prints (it builds them on
// first use, which takes minutes: scripts/test runs it before the tests so
// that no test's timeout covers a cold build).
func Binaries() (string, error) {
	if dir := os.Getenv("TRELLIS_K8SENV_BIN"); dir != "" {
		return dir, nil
	}
	_, file, _, _ := runtime.Caller(0)
	script := filepath.Join(filepath.Dir(file), "build")
	var stderr bytes.Buffer
	cmd := exec.Command(script)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("%s: %v\n%s", script, err, stderr.String())
	}
	return strings.TrimSpace(string(out)), nil
}

// Start runs etcd, kube-apiserver and kube-controller-manager until the
// test ends, and waits until the API server is ready.
func Start(t testing.TB) *Env {
	t.Helper()
	bin, err := Binaries()
	if err != nil {
		t.Fatalf("k8senv: %v", err)
	}
	e := &Env{Dir: t.TempDir(), Bin: bin, ServiceAccountIssuer: "https://kubernetes.default.svc.cluster.local"}
	pki, err := e.writePKI()
	if err != nil {
		t.Fatalf("k8senv: certificates: %v", err)
	}
	ports, err := freePorts(3)
	if err != nil {
		t.Fatalf("k8senv: %v", err)
	}
	etcdClient, etcdPeer, apiPort := ports[0], ports[1], ports[2]
	e.Server = "https://127.0.0.1:" + strconv.Itoa(apiPort)

	etcdURL := "http://127.0.0.1:" + strconv.Itoa(etcdClient)
	e.start(t, "etcd",
		"--name=k8senv", "--data-dir="+filepath.Join(e.Dir, "etcd"),
		"--listen-client-urls="+etcdURL, "--advertise-client-urls="+etcdURL,
		"--listen-peer-urls=http://127.0.0.1:"+strconv.Itoa(etcdPeer),
		"--initial-advertise-peer-urls=http://127.0.0.1:"+strconv.Itoa(etcdPeer),
		"--initial-cluster=k8senv=http://127.0.0.1:"+strconv.Itoa(etcdPeer),
		"--unsafe-no-fsync", "--log-level=warn")

	e.start(t, "kube-apiserver",
		"--etcd-servers="+etcdURL,
		"--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", "--secure-port="+strconv.Itoa(apiPort),
		"--tls-cert-file="+pki.serverCert, "--tls-private-key-file="+pki.serverKey,
		"--client-ca-file="+pki.caCert,
		"--service-account-issuer="+e.ServiceAccountIssuer,
		"--service-account-key-file="+pki.saPub, "--service-account-signing-key-file="+pki.saKey,
		"--authorization-mode=RBAC", "--service-cluster-ip-range="+ServiceCIDR,
		"--allow-privileged=true",
		"--v=0")

	if err := e.writeKubeconfig(pki); err != nil {
		t.Fatalf("k8senv: kubeconfig: %v", err)
	}
	if err := e.waitReady(pki, 60*time.Second); err != nil {
		t.Fatalf("k8senv: %v (logs under %s)", err, e.Dir)
	}

	e.start(t, "kube-controller-manager",
		"--kubeconfig="+e.Kubeconfig, "--authentication-kubeconfig="+e.Kubeconfig, "--authorization-kubeconfig="+e.Kubeconfig,
		"--bind-address=127.0.0.1", "--secure-port=0", "--leader-elect=false",
		"--service-account-private-key-file="+pki.saKey, "--root-ca-file="+pki.caCert,
		"--service-cluster-ip-range="+ServiceCIDR, "--use-service-account-credentials=false",
		// What a single-node test cluster needs: workloads' controllers,
		// service accounts, endpoints, garbage collection.
		"--controllers=deployment-controller,replicaset-controller,statefulset-controller,daemonset-controller,job-controller,cronjob-controller,serviceaccount-controller,serviceaccount-token-controller,root-ca-certificate-publisher-controller,endpointslice-controller,endpoints-controller,garbage-collector-controller,namespace-controller,disruption-controller,pod-garbage-collector-controller",
		"--v=0")
	return e
}

// Kubectl runs kubectl against the cluster with stdin, and returns its
// output; the error carries stderr.
func (e *Env) Kubectl(ctx context.Context, stdin string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, filepath.Join(e.Bin, "kubectl"), append([]string{"--kubeconfig", e.Kubeconfig}, args...)...)
	cmd.Stdin = strings.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("kubectl %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// start runs a binary until the test ends, its output in Dir/NAME.log.
func (e *Env) start(t testing.TB, name string, args ...string) {
	t.Helper()
	logFile, err := os.Create(filepath.Join(e.Dir, name+".log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(filepath.Join(e.Bin, name), args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Its own process group, and killed if the test binary dies.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		t.Fatalf("k8senv: start %s: %v", name, err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
		logFile.Close()
		if t.Failed() {
			if tail, err := tailFile(logFile.Name(), 40); err == nil {
				t.Logf("last lines of %s:\n%s", name, tail)
			}
		}
	})
}

func tailFile(path string, n int) (string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n"), nil
}

// waitReady polls /readyz with the admin's certificate.
func (e *Env) waitReady(p pki, timeout time.Duration) error {
	cert, err := tls.LoadX509KeyPair(p.adminCert, p.adminKey)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(e.CACert)
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}}}}
	defer client.CloseIdleConnections()
	deadline := time.Now().Add(timeout)
	var last string
	for time.Now().Before(deadline) {
		resp, err := client.Get(e.Server + "/readyz")
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Sprintf("%s: %s", resp.Status, body)
		} else {
			last = err.Error()
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("kube-apiserver not ready after %s: %s", timeout, last)
}

func freePorts(n int) ([]int, error) {
	var ports []int
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// pki is the files of the cluster's certificates and keys.
type pki struct {
	caCert, serverCert, serverKey, adminCert, adminKey, saKey, saPub string
}

func (e *Env) writePKI() (pki, error) {
	dir := filepath.Join(e.Dir, "pki")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return pki{}, err
	}
	p := pki{
		caCert: filepath.Join(dir, "ca.crt"), serverCert: filepath.Join(dir, "apiserver.crt"), serverKey: filepath.Join(dir, "apiserver.key"),
		adminCert: filepath.Join(dir, "admin.crt"), adminKey: filepath.Join(dir, "admin.key"),
		saKey: filepath.Join(dir, "sa.key"), saPub: filepath.Join(dir, "sa.pub"),
	}
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return pki{}, err
	}
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "k8senv-ca"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return pki{}, err
	}
	ca, _ := x509.ParseCertificate(caDER)
	e.CACert = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	if err := os.WriteFile(p.caCert, e.CACert, 0o600); err != nil {
		return pki{}, err
	}
	issue := func(serial int64, subject pkix.Name, usage x509.ExtKeyUsage, ips []net.IP, dns []string, certFile, keyFile string) error {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return err
		}
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: subject,
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage},
			IPAddresses: ips, DNSNames: dns,
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return err
		}
		if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
			return err
		}
		return writeKey(keyFile, key)
	}
	if err := issue(2, pkix.Name{CommonName: "kube-apiserver"}, x509.ExtKeyUsageServerAuth,
		[]net.IP{net.IPv4(127, 0, 0, 1)}, []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		p.serverCert, p.serverKey); err != nil {
		return pki{}, err
	}
	// system:masters: the test's administrator, and the controller
	// manager's identity.
	if err := issue(3, pkix.Name{CommonName: "k8senv-admin", Organization: []string{"system:masters"}}, x509.ExtKeyUsageClientAuth, nil, nil, p.adminCert, p.adminKey); err != nil {
		return pki{}, err
	}
	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return pki{}, err
	}
	if err := writeKey(p.saKey, saKey); err != nil {
		return pki{}, err
	}
	pub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return pki{}, err
	}
	return p, os.WriteFile(p.saPub, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}), 0o600)
}

func writeKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), 0o600)
}

func (e *Env) writeKubeconfig(p pki) error {
	e.Kubeconfig = filepath.Join(e.Dir, "kubeconfig")
	cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: k8senv
  cluster: {server: %q, certificate-authority: %q}
users:
- name: admin
  user: {client-certificate: %q, client-key: %q}
contexts:
- name: k8senv
  context: {cluster: k8senv, user: admin}
current-context: k8senv
`, e.Server, p.caCert, p.adminCert, p.adminKey)
	return os.WriteFile(e.Kubeconfig, []byte(cfg), 0o600)
}
