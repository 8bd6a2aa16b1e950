package cluster

import (
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/labels"
)

// The demo cluster of the repository (spec §5.1's fixture) loads with every object kube-ovn-cni
// reads, through the listers.
func TestLoadsTheExampleCluster(t *testing.T) {
	objs, err := Load(filepath.Join("..", "..", "..", "deploy", "examples", "cluster.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	listers, err := objs.Listers()
	if err != nil {
		t.Fatal(err)
	}
	n1, err := listers.Nodes.Get("n1")
	if err != nil {
		t.Fatal(err)
	}
	if got := n1.Annotations["ovn.kubernetes.io/ip_address"]; got != "100.64.0.2,fd00:100:64::2" {
		t.Errorf("n1 join-IP annotation = %q", got)
	}
	subnets, err := listers.Subnets.List(labels.Everything())
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range subnets {
		names = append(names, s.Name+"="+s.Spec.CIDRBlock+"@"+s.Spec.Vpc)
	}
	slices.Sort(names)
	want := []string{
		"central=10.17.0.0/16@ovn-cluster",
		"join=100.64.0.0/16@ovn-cluster",
		"ovn-default=10.16.0.0/16,fd00:10:16::/64@ovn-cluster",
		"ul=172.18.0.0/24@ovn-cluster",
		"vpc1-sub=10.0.1.0/24@vpc1",
	}
	if !slices.Equal(names, want) {
		t.Errorf("subnets = %v, want %v", names, want)
	}
	ul, _ := listers.Subnets.Get("ul")
	if ul.Spec.Vlan != "vlan10" || ul.Spec.LogicalGateway || !ul.Spec.U2OInterconnection {
		t.Errorf("ul spec = %+v", ul.Spec)
	}
	svc, err := listers.Services.Services("default").Get("kubernetes")
	if err != nil {
		t.Fatal(err)
	}
	if svc.Spec.ClusterIP != "10.96.0.1" {
		t.Errorf("kubernetes ClusterIP = %q", svc.Spec.ClusterIP)
	}
}

func TestListsAndIgnoredKinds(t *testing.T) {
	objs, err := Parse(strings.NewReader(`# comment only
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Node
  metadata: {name: a}
- apiVersion: kubeovn.io/v1
  kind: Subnet
  metadata: {name: s}
  spec: {cidrBlock: 10.0.0.0/8}
---
apiVersion: kubeovn.io/v1
kind: Vpc
metadata: {name: v}
`))
	if err != nil {
		t.Fatal(err)
	}
	if len(objs.Nodes) != 1 || len(objs.Subnets) != 1 || objs.Subnets[0].Spec.CIDRBlock != "10.0.0.0/8" {
		t.Errorf("objects = %+v", objs)
	}
	if objs.Ignored["kubeovn.io/v1/Vpc"] != 1 {
		t.Errorf("ignored = %v", objs.Ignored)
	}
}

func TestRejectsBadInput(t *testing.T) {
	for name, doc := range map[string]string{
		"no kind":   "apiVersion: v1\nmetadata: {name: a}\n",
		"bad field": "apiVersion: v1\nkind: Node\nmetadata: {name: [1]}\n",
		"duplicate": "apiVersion: v1\nkind: Node\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: a}\n",
	} {
		objs, err := Parse(strings.NewReader(doc))
		if err == nil {
			_, err = objs.Listers()
		}
		if err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
