package dns

import "testing"

func TestClassify(t *testing.T) {
	cfg, err := Config{Mesh: testMesh(), Datacenter: "DC1"}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name    string
		kind    zoneKind
		service string
	}{
		{"web.default.svc.cluster.local.", zoneCluster, "web"},
		{"web.ns2.svc.cluster.local.", zoneCluster, "web"},
		{"default.svc.cluster.local.", zoneCluster, ""},
		{"svc.cluster.local.", zoneCluster, ""},
		{"cluster.local.", zoneOther, ""}, // the apex itself is not below the zone
		{"a.web.default.svc.cluster.local.", zoneCluster, ""},
		{"_http._tcp.web.default.svc.cluster.local.", zoneCluster, ""},
		{"10-0-0-1.default.pod.cluster.local.", zoneCluster, ""},
		{"web.default.svc.cluster.local.example.", zoneOther, ""},
		{"webxcluster.local.", zoneOther, ""},
		{`web.default.svc\.cluster.local.`, zoneOther, ""},
		{"web.virtual.consul.", zoneConsul, "web"},
		{"web.virtual.peer1.consul.", zoneConsul, ""},
		{"web.service.consul.", zoneConsul, "web"},
		{"web.service.dc1.consul.", zoneConsul, "web"},
		{"web.service.dc1.dc.consul.", zoneConsul, "web"},
		{"web.service.dc2.consul.", zoneConsul, ""},
		{"v1.web.service.consul.", zoneConsul, ""},
		{"_web._tcp.service.consul.", zoneConsul, ""},
		{"_web.service.consul.", zoneConsul, ""},
		{"web.connect.consul.", zoneConsul, ""},
		{"node1.node.consul.", zoneConsul, ""},
		{"consul.", zoneOther, ""},
		{"example.com.", zoneOther, ""},
		{".", zoneOther, ""},
	}
	if !classify("web.virtual.consul.", &cfg, cfg.Datacenter).virtual || classify("web.service.consul.", &cfg, cfg.Datacenter).virtual {
		t.Error("virtual flag wrong")
	}
	for _, c := range cases {
		ni := classify(c.name, &cfg, cfg.Datacenter)
		if ni.kind != c.kind || ni.service != c.service {
			t.Errorf("%s: got kind %d service %q, want %d %q", c.name, ni.kind, ni.service, c.kind, c.service)
		}
	}
	// Custom domains, given in any case and with or without the dot.
	cfg, _ = Config{Mesh: testMesh(), ClusterDomain: "Corp.Example.", ConsulDomain: "mesh"}.withDefaults()
	if ni := classify("web.ns.svc.corp.example.", &cfg, cfg.Datacenter); ni.service != "web" || ni.zone != "corp.example." {
		t.Errorf("custom cluster domain: %+v", ni)
	}
	if ni := classify("web.virtual.mesh.", &cfg, cfg.Datacenter); ni.service != "web" {
		t.Errorf("custom consul domain: %+v", ni)
	}
}
