// Package mtls owns mesh identity: the service's leaf certificate and the
// CA roots issued by Consul, kept current, and the TLS configurations that
// present them and verify peers by SPIFFE ID. It imports nothing else of ferry.
//
// Wiring, in short:
//
//	id := mtls.NewIdentity()
//	go func() { errc <- id.Watch(ctx, consul, destinationServiceName, mtls.WatchOptions{Logger: log}) }()
//	<-id.Ready()                          // or report id.Status() on /ready until then
//	inbound := id.ServerConfig()          // once per listener
//	up := id.ClientConfig(mtls.ServiceID(id.TrustDomain(), instanceDC, "api")) // once per upstream
//	tc := tls.Client(conn, mtls.InstanceConfig(up, instanceAddr))             // per dial
//	peer, _ := mtls.PeerID(tc.ConnectionState())                             // after Handshake
//
// Configs read the current leaf and roots on every handshake (including
// resumed ones), so rotation needs no rebuild. Chain verification is done
// by this package, not by crypto/tls: never rely on tls.ConnectionState's
// VerifiedChains, which stays empty.
//
// Imports: nothing of ferry's (internal/archtest checks it). proxy calls
// it to verify peers; it never calls back.
package mtls
