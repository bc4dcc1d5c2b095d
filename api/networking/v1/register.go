package v1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// GroupVersion is the API group and version of these resources.
var GroupVersion = schema.GroupVersion{Group: "networking.trellis.dev", Version: "v1"}

// AddToScheme registers the types with a scheme.
func AddToScheme(s *runtime.Scheme) error {
	s.AddKnownTypes(GroupVersion,
		&ServiceEntry{}, &ServiceEntryList{},
		&DestinationRule{}, &DestinationRuleList{},
		&VirtualService{}, &VirtualServiceList{},
	)
	metav1.AddToGroupVersion(s, GroupVersion)
	return nil
}
